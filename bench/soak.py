"""Soak: N mixed clients for M minutes against a real ``arrowengine serve``; does its memory level off?

Builds a tiny random-weight CLIP and converts the real all-MiniLM-L6-v2 into a temporary folder
(:mod:`bench.soak_server`), starts ``python -m flight_server.serve`` on a free port, and runs ``--clients``
threads for ``--minutes``, each with its own Flight connection and one role: texts, images, tokens,
cancel, bad-request, disconnect, stream, image-stream (:mod:`bench.soak_clients`; they cycle for more than
8 clients). Every answer is checked against reference embeddings computed before the run
(:mod:`bench.soak_inputs`); anything the protocol does not promise counts as an unexpected failure.

The server's RSS (``/proc/<pid>/status`` VmRSS) is sampled every ``--sample-s`` for the whole run and
judged by :func:`bench.soak_rule.judge` (one rule, see there). The run fails (exit 1) when the verdict is
"growing", on any unexpected failure, when exchange slots are still held after the clients stopped, or
when the server does not exit cleanly on SIGTERM.

``--leak-control`` is the negative control: the same server, clients and rule, but the server is
started through this module (``python -m bench.soak --_serve MB ...``), which patches
``EmbeddingServer._batch_written`` to keep ``MB`` (default 1) MiB per written batch before calling
``flight_server.serve.main``; the rule must say "growing" (exit 1). Server code is not changed.

    python -m bench.soak [--clients 8] [--minutes 2] [--leak-control]
    python -m bench.soak --server grpc://HOST:PORT --pid PID        # soak a running server

Prints one table and writes ``bench/results/soak-<machine>.json`` (``soak-<machine>-leak.json`` with
``--leak-control``), the RSS series included. MB here are MiB (2**20 bytes).
"""
from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from bench.soak_clients import CALL_TIMEOUT_S, ROLES, Client, Tally
from bench.soak_inputs import Pools, Served, discover, make_pools
from bench.soak_report import make_report, print_table
from bench.soak_rule import MB, MIN_SAMPLES, judge
from bench.soak_server import ROOT, RssSampler, Server, build_models, read_rss, serve_leaking

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench.soak")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_serve"]:
        return serve_leaking(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warmup_s = args.warmup_frac * args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        server = None if args.server else start_server(Path(tmp), args.leak_control, args.leak_mb)
        location, pid = (server.location, server.pid) if server else (args.server, args.pid)
        if server is None:
            read_rss(pid)  # fails now, not after the run
        try:
            served, run, stats = run_clients(location, pid, args, warmup_s)
        finally:
            exit_code = server.stop() if server is not None else None
        if server is not None and exit_code != 0:
            run["tally"].fail("soak", "server exit", f"the server exited with {exit_code} after SIGTERM (expected 0)")
    try:
        verdict = judge(run["samples"], warmup_s)
    except ValueError as exc:  # the server died early, say: the failures say why
        log.error("no verdict: %s; unexpected failures: %s", exc, run["tally"].examples[:5])
        return 1
    report = make_report(args, location, pid, served, run, stats, server, exit_code, verdict, warmup_s)
    print_table(report)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"soak-{args.machine}{'-leak' if args.leak_control else ''}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 1 if verdict.growing or sum(run["tally"].unexpected.values()) else 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients, 1-64 (default 8: one per role)")
    ap.add_argument("--minutes", type=float, default=2.0, help="how long the clients run, 0.25-60 (default 2)")
    ap.add_argument("--warmup-frac", type=float, default=0.3,
                    help="share of the run left out of the verdict at its start (default 0.3)")
    ap.add_argument("--sample-s", type=float, default=0.5, help="RSS sampling interval (default 0.5)")
    ap.add_argument("--leak-control", action="store_true",
                    help="negative control: the server keeps --leak-mb MiB per written batch; the rule must "
                         "catch it (exit 1)")
    ap.add_argument("--leak-mb", type=float, default=1.0, help="MiB kept per batch with --leak-control (default 1)")
    ap.add_argument("--server", help="soak a running server at this URI instead of starting one (needs --pid)")
    ap.add_argument("--pid", type=int, help="with --server: the server's process id, for its RSS")
    ap.add_argument("--machine", default=socket.gethostname(), help="results name (default: hostname)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 1 <= args.clients <= 64:
        ap.error("--clients must be 1-64")
    if not 0.25 <= args.minutes <= 60:
        ap.error("--minutes must be 0.25-60")
    if not 0 <= args.warmup_frac < 0.9:
        ap.error("--warmup-frac must be in [0, 0.9)")
    if not 0.05 <= args.sample_s <= 10:
        ap.error("--sample-s must be 0.05-10")
    if (1 - args.warmup_frac) * args.minutes * 60 / args.sample_s < 2 * MIN_SAMPLES:
        ap.error(f"too few RSS samples after the warm-up: take a longer run or a shorter --sample-s "
                 f"(at least {2 * MIN_SAMPLES} samples after the warm-up)")
    if args.server and args.pid is None:
        ap.error("--server needs --pid (the server's process id, for its RSS)")
    if args.server and args.leak_control:
        ap.error("--leak-control starts its own server; leave out --server")
    return args


def start_server(folder: Path, leak_control: bool, leak_mb: float) -> Server:
    """Build the models into ``folder`` and start a server for them (the leaking one for the control)."""
    models = build_models(folder)
    serve_args = ["--port", "0", *(a for name, d in models.items() for a in ("--model", f"{name}={d}"))]
    if leak_control:
        cmd = [sys.executable, "-m", "bench.soak", "--_serve", str(leak_mb), *serve_args]
        log.warning("leak control: the server keeps %g MiB per written batch", leak_mb)
    else:
        cmd = [sys.executable, "-m", "flight_server.serve", *serve_args]
    server = Server(cmd)
    log.info("server pid %d at %s, RSS %.0f MB after warm-up", server.pid, server.location, read_rss(server.pid) / MB)
    return server


def run_clients(location: str, pid: int, args: argparse.Namespace,
                warmup_s: float) -> tuple[Served, dict[str, Any], dict]:
    """Set up the inputs, run the clients for ``--minutes`` and read the server's counters after them."""
    served = discover(location)
    pools = make_pools(location, served, args.seed)
    log.info("reference embeddings computed; server RSS %.0f MB", read_rss(pid) / MB)
    run = soak(location, pid, served, pools, args.clients, args.minutes * 60, args.sample_s, warmup_s, args.seed)
    return served, run, after_run(location, run["tally"])


def soak(location: str, pid: int, served: Served, pools: Pools, clients: int, seconds: float,
         sample_s: float, warmup_s: float, seed: int, progress_s: float = 12.0) -> dict[str, Any]:
    """Run ``clients`` clients until ``seconds`` from now, sampling the server's RSS; the tally and the series."""
    tally = Tally()
    t0 = time.monotonic()
    sampler = RssSampler(pid, sample_s, t0)
    deadline = t0 + seconds
    roles = [ROLES[i % len(ROLES)] for i in range(clients)]
    if not served.image:
        roles = [{"images": "texts", "image-stream": "stream"}.get(r, r) for r in roles]
    workers = [Client(i, role, location, served, pools, tally, deadline, seed * 1000 + i)
               for i, role in enumerate(roles)]
    threads = [threading.Thread(target=w.run, name=f"soak-{w.role}-{w.index}", daemon=True) for w in workers]
    for t in threads:
        t.start()
    log.info("%d clients (%s) for %.0fs; RSS sampled every %.1fs; warm-up %.0fs", clients, ", ".join(roles),
             seconds, sample_s, warmup_s)
    _wait_for(threads, deadline + 2 * CALL_TIMEOUT_S, tally, sampler, t0, progress_s)
    elapsed = time.monotonic() - t0
    samples = sampler.stop()
    if sampler.error:
        tally.fail("soak", "rss", sampler.error)
    return {"tally": tally, "samples": samples, "elapsed_s": elapsed, "roles": roles}


def _wait_for(threads: list[threading.Thread], hard_stop: float, tally: Tally, sampler: RssSampler, t0: float,
              progress_s: float) -> None:
    """Until every client stopped (a failure past ``hard_stop``), logging progress every ``progress_s``."""
    next_log = t0 + progress_s
    while any(t.is_alive() for t in threads):
        if time.monotonic() > hard_stop:
            tally.fail("soak", "clients did not stop",
                       f"{sum(t.is_alive() for t in threads)} client(s) still busy {2 * CALL_TIMEOUT_S:g}s "
                       "after the deadline")
            return
        time.sleep(0.2)
        if time.monotonic() >= next_log:
            next_log += progress_s
            log.info("%5.0fs  requests %d  rows %d  unexpected %d  server RSS %.0f MB", time.monotonic() - t0,
                     tally.total("requests"), tally.total("rows"), sum(tally.unexpected.values()), sampler.last_mb)


def after_run(location: str, tally: Tally) -> dict[str, Any]:
    """The server's own counters once the clients stopped; every exchange slot must be free again."""
    from flight_client import EmbeddingClient

    with EmbeddingClient(location, timeout_s=30) as client:
        deadline = time.monotonic() + 15
        stats = client.stats()
        while stats.get("active_exchanges", 0) and time.monotonic() < deadline:
            time.sleep(0.25)
            stats = client.stats()
        if stats.get("active_exchanges", 0):
            tally.fail("soak", "slots still held",
                       f"{stats['active_exchanges']} exchange(s) still active 15s after the clients stopped")
        health = client.health()
        if health.get("status") != "ok":
            tally.fail("soak", "health", f"health after the run: {health}")
    return stats


if __name__ == "__main__":
    sys.exit(main())

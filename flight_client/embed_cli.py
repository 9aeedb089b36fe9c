"""``arrowengine embed INPUT OUTPUT --kind image|text|tokens ...``: a resumable bulk embedding job.

INPUT is a Parquet file, a folder of Parquet files, or (--kind image) a folder of image
files. OUTPUT is a folder of Parquet shards (part-00000.parquet, ...) plus _job.json, or,
ending in .lance (or with --format lance), a Lance dataset (pip install "arrowengine[lance]"):
passthrough columns (by default every input column but the embedded one; image folders:
path), embedding, error. Without --server the engine
runs in this process; with one or more --server the servers share the batches, and a
server that dies hands its batches to the others. After a crash or kill, run the same
command with --resume. With --server the base (client-only) install is enough; in-process
needs the engine: pip install "arrowengine[server]".

Examples:
  arrowengine embed texts.parquet out/ --kind text --passthrough id
  arrowengine embed photos/ out/ --kind image --model ~/models/clip-b32
  arrowengine embed photos/ out/ --kind image --model clip --server grpc://h1:8815 --server grpc://h2:8815
  arrowengine embed photos/ out/ --kind image --model clip --server grpc://h1:8815 --resume
  arrowengine embed photos/ photos.lance --kind image --model clip --server grpc://h1:8815 --index
  arrowengine embed texts.parquet out/ --kind text --dimensions 256 --output-dtype int8 --no-truncate
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from convert import store
from engine import PRECISIONS
from engine.output import OUTPUT_DTYPES
from flight_server import protocol
from flight_server.flags import add_deprecated_alias

log = logging.getLogger("arrowengine.embed")


def add_parsers(subparsers: Any) -> None:
    """Register the ``embed`` subcommand (``func=run``) on an argparse subparsers object."""
    parser = subparsers.add_parser("embed", help="embed a Parquet dataset or a folder of images (resumable)",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``embed``."""
    parser.add_argument("input", type=Path, metavar="INPUT", help="Parquet file or folder, or folder of images")
    parser.add_argument("output", type=Path, metavar="OUTPUT",
                        help="output folder of Parquet shards, or a Lance dataset (a name ending in .lance)")
    parser.add_argument("--format", choices=("parquet", "lance"), default=None,
                        help="output format (default: lance where OUTPUT ends in .lance, else parquet)")
    parser.add_argument("--index", action="store_true",
                        help="Lance output: build an IVF-PQ vector index on the embeddings at the end "
                             "(none below 256 embedded rows: a search then scans every row)")
    parser.add_argument("--kind", required=True, choices=protocol.EMBED_KINDS, help="what the input column holds")
    parser.add_argument("--column", default=None,
                        help="input column (default: image / text / input_ids by --kind)")
    parser.add_argument("--model", default=None,
                        help="with --server: the served model name (default: the server's default); "
                             "in-process: a model directory or a name in the model cache")
    parser.add_argument("--server", action="append", default=[], metavar="URI",
                        help="Flight server, e.g. grpc://127.0.0.1:8815 (repeatable: they share the work)")
    parser.add_argument("--batch-rows", type=int, default=64, help="rows per batch (default %(default)s)")
    parser.add_argument("--shard-rows", type=int, default=8192,
                        help="rows per output shard, rounded up to whole batches (default %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue the job already in OUTPUT")
    parser.add_argument("--passthrough", nargs="+", action="extend", default=None, metavar="COL",
                        help="input columns to copy into the output (default: every column of a Parquet input "
                             "but the embedded one)")
    parser.add_argument("--no-passthrough", action="store_true",
                        help="copy no input column (the output then joins back to the input by row order only)")
    parser.add_argument("--no-normalize", action="store_true", help="do not L2-normalize the embeddings")
    parser.add_argument("--prompt-name", default=None,
                        help="--kind text: the model's prompt to put before every text, e.g. query or document "
                             "(default: the model's default prompt, if any)")
    parser.add_argument("--dimensions", type=_positive_int, default=None, metavar="K",
                        help="keep the first K components of each embedding (Matryoshka truncation; normalized again "
                             "unless --no-normalize); default: all")
    parser.add_argument("--output-dtype", default="float32", choices=OUTPUT_DTYPES,
                        help="embedding values: float32 (default), float16, int8 / uint8 (per-row scale, and offset, "
                             "in embedding_scale / embedding_offset columns), binary / ubinary (sign bits, 8 per byte)")
    parser.add_argument("--no-truncate", action="store_true",
                        help="--kind text: a text over the model's token limit is a row error instead of being cut")
    parser.add_argument("--discover", action="store_true",
                        help="with --server: also use every endpoint the servers advertise in get_flight_info")
    parser.add_argument("--auth-token-file", type=Path, default=None,
                        help="file holding the servers' bearer token (serve --auth-token-file)")
    parser.add_argument("--tls-root-certs", type=Path, default=None,
                        help="PEM file of the CA that signed the servers' certificates")
    parser.add_argument("--device", default="cpu", help="in-process only: cpu or cuda[:n] (default cpu)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help="in-process only (default fp32)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"in-process model cache (default ${store.CACHE_ENV} or ~/.cache/arrowengine/models)")
    parser.add_argument("--call-timeout", type=float, default=600.0, metavar="S",
                        help="with --server: seconds one batch may take on a server before it is sent to another "
                             "(a stalled server must not hang the job; default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_deprecated_alias(parser, "--token-file", "--auth-token-file")


def config_from_args(args: argparse.Namespace) -> Any:
    """Build the JobConfig (reads the token file); raises ValueError with what to fix."""
    from flight_client.jobs import JobConfig

    from flight_server.auth import read_token_file

    token = None if args.auth_token_file is None else read_token_file(args.auth_token_file, "--auth-token-file")
    if args.tls_root_certs is not None and not args.tls_root_certs.is_file():
        raise ValueError(f"--tls-root-certs {args.tls_root_certs}: no such file")
    if args.server and (args.device != "cpu" or args.precision != "fp32"):
        log.warning("--device and --precision apply in-process only; the servers use their own")
    if args.no_passthrough and args.passthrough:
        raise ValueError(f"--no-passthrough and --passthrough {' '.join(args.passthrough)} contradict each other; "
                         "give one")
    passthrough = () if args.no_passthrough else None if args.passthrough is None else tuple(args.passthrough)
    servers = tuple(args.server)
    if args.discover:
        servers = discover_servers(servers, args.model, token, args.tls_root_certs)
    return JobConfig(input=args.input, output=args.output, kind=args.kind, column=args.column,
                     model=args.model, servers=servers, batch_rows=args.batch_rows,
                     shard_rows=args.shard_rows, resume=args.resume, passthrough=passthrough,
                     format=args.format, index=args.index,
                     normalize=not args.no_normalize, prompt_name=args.prompt_name,
                     dimensions=args.dimensions, output_dtype=args.output_dtype, truncate=not args.no_truncate,
                     token=token,
                     tls_root_certs=args.tls_root_certs,
                     device=args.device, precision=args.precision, cache_dir=args.cache_dir,
                     progress=not args.no_progress, call_timeout_s=args.call_timeout)


def _positive_int(text: str) -> int:
    """argparse type of --dimensions: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer (components to keep), got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (components to keep), got {value}")
    return value


def discover_servers(servers: tuple[str, ...], model: str | None, token: str | None,
                     tls_root_certs: Path | None) -> tuple[str, ...]:
    """The given servers plus every endpoint they advertise for ``model`` (order kept, no repeats)."""
    from flight_client.client import EmbeddingClient

    found = list(servers)
    for uri in servers:
        try:
            with EmbeddingClient(uri, token=token, tls_root_certs=tls_root_certs, retries=0) as client:
                found += client.endpoints(model)
        except Exception as exc:  # an unreachable server is the pool's problem, not discovery's
            log.warning("could not ask %s for endpoints: %s", uri, exc)
    unique: dict[str, str] = {}  # one entry per server: grpc://h:p and grpc+tcp://h:p are the same
    for uri in found:
        unique.setdefault(_same_server_key(uri), uri)
    return tuple(unique.values())


def _same_server_key(uri: str) -> str:
    """``uri`` with the scheme aliases gRPC Flight accepts folded together (grpc == grpc+tcp)."""
    scheme, sep, rest = uri.partition("://")
    return ({"grpc": "grpc+tcp"}.get(scheme.lower(), scheme.lower()) + sep + rest) if sep else uri


def run(args: argparse.Namespace) -> int:
    """Run the job; 0 when complete, 1 when it stopped (resumable), 2 on bad arguments, 130 on Ctrl-C."""
    from flight_client.jobs import JobError, JobUsageError, run_job

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    try:
        run_job(config)
    except JobUsageError as exc:
        log.error("%s", exc)
        return 2
    except JobError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; the finished shards are kept: rerun the same command with --resume")
        return 130
    return 0

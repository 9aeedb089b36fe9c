"""``arrowengine convert`` and ``arrowengine inspect``.

The ``arrowengine`` command (``flight_client/cli.py``) mounts these with :func:`add_parsers`;
``python -m convert`` runs them on their own. Both need the engine (``pip install "arrowengine[server]"``)::

    python -m convert convert openai/clip-vit-base-patch32 models/clip-b32 --dtype float16
    python -m convert convert --manifest models.json --out-root models
    python -m convert inspect models/clip-b32 --verify
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable, Sequence

from engine import EngineNotInstalledError, require_engine, set_thread_defaults
from engine.errors import ArrowEngineError
from engine.format import DTYPE_CHOICES, WEIGHT_FILES

log = logging.getLogger(__name__)


def add_parsers(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register the ``convert`` and ``inspect`` sub-commands (each sets ``func(args) -> int``)."""
    p = subparsers.add_parser(
        "convert", help="convert a HuggingFace checkpoint into an ArrowEngine model directory",
        description="Convert SOURCE (local checkpoint directory or hub id) into OUT_DIR, or every "
                    "entry of a --manifest JSON list [{name, source, dtype?, format?}] into OUT_ROOT/name; "
                    "--dtype and --format are the defaults for entries that set no dtype/format of their "
                    "own. OUT_DIR must not be, lie inside or contain a local SOURCE.")
    p.add_argument("source", nargs="?", metavar="SOURCE", help="checkpoint directory or hub id")
    p.add_argument("out_dir", nargs="?", metavar="OUT_DIR", help="model directory to create")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep",
                   help="keep tensors byte-exact (default) or cast floating tensors; with --manifest, "
                        "the default for entries without a \"dtype\"")
    p.add_argument("--format", choices=list(WEIGHT_FILES), default="arrow", dest="fmt",
                   help="arrow: mapped zero-copy loads (default); parquet: zstd, smaller, copied on load; "
                        "with --manifest, the default for entries without a \"format\"")
    p.add_argument("--manifest", metavar="FILE",
                   help="JSON list of conversions to run; a failed or malformed entry is a FAILED row "
                        "(full reason logged) and the others still run")
    p.add_argument("--out-root", metavar="DIR", default=".", help="where --manifest entries go (default .)")
    p.add_argument("--force", action="store_true", help="replace existing output directories")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_guarded(_cmd_convert), _parser=p)

    q = subparsers.add_parser("inspect", help="show (and verify) a converted model directory")
    q.add_argument("model_dir", metavar="DIR")
    q.add_argument("--verify", action="store_true", help="recompute and check every SHA-256")
    q.set_defaults(func=_guarded(_cmd_inspect))


def _cmd_convert(args: argparse.Namespace) -> int:
    require_engine("arrowengine convert")
    from convert.pipeline import convert_batch, convert_checkpoint, read_batch_file

    progress = False if args.no_progress else None
    if args.manifest:
        if args.source or args.out_dir:
            args._parser.error("give either SOURCE OUT_DIR or --manifest FILE, not both")
        entries = read_batch_file(args.manifest, dtype=args.dtype, fmt=args.fmt)
        rows = convert_batch(entries, args.out_root, force=args.force, progress=progress)
        _print_table(["name", "architecture", "kind", "tensors", "parameters", "bytes", "seconds",
                      "status"],
                     [[r.name, r.architecture, r.kind, r.tensors, f"{r.parameters:,}", f"{r.bytes:,}",
                       f"{r.seconds:.2f}", _clip(r.status)] for r in rows])
        failed = sum(r.status != "ok" for r in rows)
        if failed:
            print(f"{failed} of {len(rows)} conversions failed (full reasons in the log above the table)",
                  file=sys.stderr)
        return 1 if failed else 0
    if not (args.source and args.out_dir):
        args._parser.error("SOURCE and OUT_DIR are required (or --manifest FILE)")
    res = convert_checkpoint(args.source, args.out_dir, dtype=args.dtype, fmt=args.fmt,
                             force=args.force, progress=progress)
    m = res.manifest
    print(f"{res.out_dir}: {m.architecture} ({m.kind}), {m.tensors} tensors, {m.parameters:,} parameters, "
          f"{m.bytes:,} bytes, {m.weights_format}/{m.dtype}, {res.seconds:.2f} s")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    require_engine("arrowengine inspect")
    from convert.verify import describe, verify

    m, wf = describe(args.model_dir)
    print(f"{args.model_dir}: {m.architecture} ({m.kind}), format {m.format} v{m.format_version}, "
          f"{m.weights} ({m.weights_format}, dtype {m.dtype})")
    print(f"  {m.tensors} tensors, {m.parameters:,} parameters, {m.bytes:,} bytes, sha256 {m.sha256}")
    print(f"  source {m.source}, created {m.created}, files: {', '.join(m.files) or '-'}")
    _print_table(["name", "dtype", "shape", "bytes"],
                 [[i.name, i.dtype, "x".join(map(str, i.shape)) or "()", f"{i.nbytes:,}"]
                  for i in wf.infos()])
    if not args.verify:
        return 0
    problems = verify(args.model_dir)
    for p in problems:
        print(f"MISMATCH {p}")
    print("verify: OK" if not problems else f"verify: {len(problems)} mismatch(es)")
    return 1 if problems else 0


def _clip(text: str, width: int = 100) -> str:
    """``text`` cut to ``width`` characters, ending in '...' when cut (keeps table rows readable)."""
    return text if len(text) <= width else text[:width - 3].rstrip() + "..."


def _print_table(header: list[str], rows: list[list[object]]) -> None:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _guarded(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command so ArrowEngine and OS errors become a one-line message and exit status 1 (a missing
    engine: exit status 2)."""

    @functools.wraps(cmd)
    def run(args: argparse.Namespace) -> int:
        set_thread_defaults()  # before torch loads
        try:
            return cmd(args)
        except EngineNotInstalledError as exc:
            log.error("%s", exc)
            return 2
        except BrokenPipeError:  # `arrowengine inspect DIR | head`: the reader is gone, nothing is wrong
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            return 0
        except (ArrowEngineError, OSError) as exc:
            log.debug("command failed", exc_info=True)
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m convert {convert,inspect} ...``."""
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)

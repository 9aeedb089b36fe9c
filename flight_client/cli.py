"""The ``arrowengine`` command: convert, inspect, serve, embed (and ``--version``).

Each subcommand lives with the package that owns it and registers itself on the shared
argparse parser (``convert/cli.py``, ``flight_server/serve.py``, ``flight_client/embed_cli.py``);
this module only assembles them and sets up logging. It lives in the client package, which
may import the others (the server never imports the client), and importing it imports no
torch: a client-only install (``pip install arrowengine``) runs ``arrowengine embed --server ...``,
and the commands that need the engine say which extra to install.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import logging
import re
import sys
from pathlib import Path

DISTRIBUTION = "arrowengine"


def package_version() -> str:
    """The installed version of arrowengine; from a source tree without install metadata, pyproject.toml's."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        version = _pyproject_version(pyproject.read_text(encoding="utf-8"))
    except OSError:
        version = None
    return version or f"unknown (no install metadata and no version in {pyproject})"


def _pyproject_version(text: str) -> str | None:
    """``version = "..."`` of the ``[project]`` table of a pyproject.toml, or None."""
    in_project = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            in_project = stripped == "[project]"
        elif in_project:
            match = re.fullmatch(r'version\s*=\s*"([^"]+)"(\s*#.*)?', stripped)
            if match:
                return match.group(1)
    return None


def build_parser() -> argparse.ArgumentParser:
    """The ``arrowengine`` parser with every subcommand registered (imports no torch)."""
    parser = argparse.ArgumentParser(
        prog="arrowengine",
        description="Arrow Flight embedding server for CLIP and sentence-transformer models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from convert.cli import add_parsers as add_convert
    from flight_client.embed_cli import add_parsers as add_embed
    from flight_server.serve import add_parsers as add_serve

    add_convert(sub)
    add_serve(sub)
    add_embed(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``arrowengine`` (``python -m flight_client.cli``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

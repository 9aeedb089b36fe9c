"""The ``arrowengine`` command: convert, inspect, serve, embed.

Each subcommand lives with the package that owns it and registers itself on
the shared argparse parser; this module only assembles them and sets up logging.
"""
from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arrowengine",
        description="Arrow Flight embedding server for CLIP and sentence-transformer models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from convert.cli import add_parsers as add_convert
    from flight_client.embed_cli import add_parsers as add_embed
    from flight_server.serve import add_parsers as add_serve

    add_convert(sub)
    add_serve(sub)
    add_embed(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
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

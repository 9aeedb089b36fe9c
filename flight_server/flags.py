"""Old spellings of command-line options: accepted, hidden from ``--help``, and logged as deprecated.

Options are named like the configuration fields they set (``--max-concurrent-exchanges`` sets
``ServerLimits.max_concurrent_exchanges``); a renamed option keeps its old spelling as an alias.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

log = logging.getLogger("arrowengine.cli")


class _DeprecatedAlias(argparse.Action):
    """Stores the value as the option it stands for does, after a warning naming the new spelling."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        log.warning("%s is deprecated and will be removed; use %s", option_string, self.new)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Accept ``old`` as a hidden, deprecated spelling of the option ``new`` (already added to ``parser``):
    the same destination, type and number of values; using it logs a warning that names ``new``."""
    target = parser._option_string_actions[new]
    parser.add_argument(old, dest=target.dest, type=target.type, nargs=target.nargs, metavar=target.metavar,
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS, action=_DeprecatedAlias, new=new)

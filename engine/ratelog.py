"""Log lines that a client can trigger over and over, at a bounded rate.

A client that sends a wrong token a thousand times a second, or a thousand images that each fail oddly,
must not turn the log into a flood: each kind of line is written at most once per period, and the next
one says how many were left out.
"""
from __future__ import annotations

import logging
import threading
import time


class RateLimitedLog:
    """At most one line per ``period_s`` per key (keys are a fixed set of kinds, never client input)."""

    def __init__(self, logger: logging.Logger, period_s: float = 10.0) -> None:
        self._logger = logger
        self._period = period_s
        self._lock = threading.Lock()
        self._state: dict[str, tuple[float, int]] = {}  # key -> (time of the last line written, lines left out)

    def log(self, level: int, key: str, msg: str, *args: object, exc_info: object = None) -> bool:
        """Write ``msg % args`` unless a line of this ``key`` was written less than ``period_s`` ago;
        returns whether it was written."""
        now = time.monotonic()
        with self._lock:
            last, skipped = self._state.get(key, (float("-inf"), 0))
            if now - last < self._period:
                self._state[key] = (last, skipped + 1)
                return False
            self._state[key] = (now, 0)
        if skipped:
            msg += " (%d more like it in the last %.0f s were not logged)"
            args += (skipped, now - last)
        self._logger.log(level, msg, *args, exc_info=exc_info)
        return True

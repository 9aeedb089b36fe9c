"""Keep glibc from handing large activation buffers back to the kernel after every op.

glibc serves allocations above its mmap threshold (128 KiB at start, adapting up
to 32 MiB) with fresh ``mmap`` calls and unmaps them on free, and trims the heap
top eagerly. A transformer forward pass allocates and frees buffers of 5-20 MiB
per op, so every op then page-faults its output in again: on a 2-core VM that cost
25-30 % of CLIP B/32 int8 throughput (15.4 -> 19.5 img/s with the settings below,
fp32 12.9 -> 14.4, measured in one run with bench-style inputs).

:func:`tune` raises the mmap threshold to 32 MiB and the trim threshold to 128 MiB,
the same effect as starting the process with ``MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=134217728``, so freed buffers are reused instead of
returned. The cost is memory kept for reuse: peak RSS of the B/32 fp32 benchmark
suite 1142 MB untuned, 1188 MB tuned. Also capping malloc's arenas
(MALLOC_ARENA_MAX=2) brought it to 1107 MB, but Flight-vs-in-process throughput
(bench/serving.py) came out 82-107 % with the cap and 89-108 % without over three
runs each; the server's gRPC and scheduler threads would share one arena, so the
arenas are left alone until a quieter machine can settle it.
Set ``ARROWENGINE_MALLOC_TUNING=0`` to leave the allocator alone entirely.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 128 * 1024 * 1024


@functools.cache
def _mallopt():
    """glibc's ``mallopt`` on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt


@functools.cache  # two threads racing here would both call mallopt with the same values: harmless
def tune() -> bool:
    """Apply the thresholds once per process (glibc on Linux only). Returns True if they are set."""
    if os.environ.get("ARROWENGINE_MALLOC_TUNING", "1") == "0":
        log.debug("malloc tuning disabled by ARROWENGINE_MALLOC_TUNING=0")
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("malloc: mmap threshold %d, trim threshold %d (%s)", MMAP_THRESHOLD, TRIM_THRESHOLD,
              "set" if ok else "refused")
    return ok


@contextlib.contextmanager
def long_lived_blocks_mapped(threshold: int = 1 << 20):
    """While building long-lived buffers (packed or quantized weights), serve blocks of ``threshold`` bytes and
    more with their own ``mmap``.

    With the raised mmap threshold above, a load that packs weights would put them on the malloc heap between
    its own temporaries; the holes those leave are never trimmed and activations fit them badly (B/32 with
    every fp32 weight packed, a bench-style run: peak RSS 1242-1272 MB, 1115-1117 MB with this; plain weights
    1102 MB). Mapped one by one, the weights sit outside the heap and a freed temporary goes back to the
    kernel. No effect when :func:`tune` is off.
    """
    mallopt = _mallopt() if tune() else None
    if mallopt is None:
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)

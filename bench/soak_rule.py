"""The soak's verdict on a server's memory: :func:`judge` turns an RSS series into "plateau" or "growing".

Pure and standard library only: the rule, its limits and the figures it decides on, testable without a
server. MB here are MiB (2**20 bytes).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

MB = 1024 ** 2

RISE_MB = 64.0           # median RSS of the last third after warm-up minus the max of the first third
SLOPE_MB_PER_MIN = 30.0  # least-squares slope after warm-up, and the last third's median-based slope
MIN_SAMPLES = 9          # after warm-up (and at least 2 in its first and last thirds)


@dataclass(frozen=True)
class Verdict:
    """What :func:`judge` decided about one RSS series, and the figures it decided on (MB = MiB)."""

    verdict: str                 # "plateau" or "growing"
    reason: str                  # the limits that decided it
    warmup_s: float
    samples: int                 # samples after warm-up
    rss_warmup_end_mb: float     # the first sample after warm-up
    rss_end_mb: float            # the last sample
    rss_peak_mb: float           # the largest sample, warm-up included
    first_third_max_mb: float    # after warm-up, by time
    last_third_median_mb: float
    rise_mb: float               # last_third_median_mb - first_third_max_mb
    slope_mb_per_min: float      # least squares over every sample after warm-up
    tail_slope_mb_per_min: float  # the last third: (median of its 2nd half - median of its 1st half) / time apart

    @property
    def growing(self) -> bool:
        return self.verdict == "growing"


def judge(samples: Sequence[tuple[float, float]], warmup_s: float, *, rise_mb: float = RISE_MB,
          slope_mb_per_min: float = SLOPE_MB_PER_MIN) -> Verdict:
    """Plateau or growing, from ``samples`` = [(t seconds, rss bytes), ...] in time order.

    The samples of the first ``warmup_s`` seconds (counted from the first sample) are left out; the rest
    are split by time into thirds. The series is "growing" when all three hold:

    1. rise: the median of the last third is more than ``rise_mb`` above the largest sample of the
       first third (a max against a median: allocator noise of tens of MB does not add up to a rise);
    2. trend: the least-squares slope over everything after warm-up is above ``slope_mb_per_min``;
    3. still growing: the last third's own slope is above ``slope_mb_per_min``, measured with medians
       (its second half's median minus its first half's, over the time between the halves' middles), so
       that a jump in its last few samples does not count as a trend.

    Otherwise it is a "plateau". A leak keeps all three true. A one-time step (a cache filled once, an
    allocator arena that grows once) followed by a flat stretch passes 1 and 2 when it lands in the
    middle third but not 3: it is a plateau, whatever its size, as long as the last third is flat. A
    step near the middle of the last third looks like the start of a leak and is judged "growing"; a
    step inside the first third is part of the first third's max and raises nothing.

    Raises:
        ValueError: fewer than ``MIN_SAMPLES`` samples after warm-up (or fewer than 2 in a third), times
            that go backwards, no time span after warm-up, a negative or non-finite ``warmup_s`` or
            sample.
    """
    points = _checked(samples, warmup_s)
    post = _after_warmup(points, warmup_s)
    first, last = _thirds(post)
    first_max = max(first) / MB
    last_median = statistics.median(r for _, r in last) / MB
    rise = last_median - first_max
    slope = _slope(post) * 60 / MB
    tail = _median_slope(last) * 60 / MB
    checks = [(rise > rise_mb, f"the last third's median is {rise:+.0f} MB from the first third's max "
                                f"({_cmp(rise, rise_mb)} {rise_mb:g})"),
              (slope > slope_mb_per_min, f"slope {slope:+.1f} MB/min ({_cmp(slope, slope_mb_per_min)} "
                                         f"{slope_mb_per_min:g})"),
              (tail > slope_mb_per_min, f"last-third slope {tail:+.1f} MB/min "
                                        f"({_cmp(tail, slope_mb_per_min)} {slope_mb_per_min:g})")]
    growing = all(ok for ok, _ in checks)
    return Verdict(verdict="growing" if growing else "plateau", reason=_reason(checks), warmup_s=float(warmup_s),
                   samples=len(post), rss_warmup_end_mb=post[0][1] / MB, rss_end_mb=post[-1][1] / MB,
                   rss_peak_mb=max(r for _, r in points) / MB, first_third_max_mb=first_max,
                   last_third_median_mb=last_median, rise_mb=rise, slope_mb_per_min=slope,
                   tail_slope_mb_per_min=tail)


def _checked(samples: Sequence[tuple[float, float]], warmup_s: float) -> list[tuple[float, float]]:
    """The samples as floats, once ``warmup_s`` and every sample are known to be usable."""
    if not math.isfinite(warmup_s) or warmup_s < 0:
        raise ValueError(f"warmup_s must be a finite number >= 0; got {warmup_s!r}")
    points = [(float(t), float(r)) for t, r in samples]
    if len(points) < 2:
        raise ValueError(f"need at least {MIN_SAMPLES} RSS samples after the warm-up; got {len(points)} in all")
    for i, (t, r) in enumerate(points):
        if not (math.isfinite(t) and math.isfinite(r)) or r < 0:
            raise ValueError(f"sample {i} is ({t}, {r}): expected finite times and RSS >= 0 bytes")
        if i and t < points[i - 1][0]:
            raise ValueError(f"sample times must not go backwards: sample {i} at {t}s after {points[i - 1][0]}s")
    return points


def _after_warmup(points: list[tuple[float, float]], warmup_s: float) -> list[tuple[float, float]]:
    """The samples from ``warmup_s`` after the first one on; at least ``MIN_SAMPLES`` over a time span."""
    start = points[0][0]
    post = [(t, r) for t, r in points if t - start >= warmup_s]
    span = post[-1][0] - post[0][0] if post else 0.0
    if len(post) < MIN_SAMPLES or span <= 0:
        raise ValueError(f"need at least {MIN_SAMPLES} RSS samples over a time span after the {warmup_s:g}s warm-up; "
                         f"got {len(post)} of {len(points)} (series {points[-1][0] - start:g}s long): "
                         "run longer, sample more often or shorten the warm-up")
    return post


def _thirds(post: list[tuple[float, float]]) -> tuple[list[float], list[tuple[float, float]]]:
    """The first third's RSS values and the last third's (t, rss) samples, thirds by time."""
    t_first = post[0][0]
    span = post[-1][0] - t_first
    first = [r for t, r in post if t < t_first + span / 3]
    last = [(t, r) for t, r in post if t >= t_first + 2 * span / 3]
    if len(first) < 2 or len(last) < 2:
        raise ValueError(f"too few samples in the first or last third after warm-up ({len(first)}, {len(last)}); "
                         "sample more evenly")
    return first, last


def _cmp(value: float, limit: float) -> str:
    return ">" if value > limit else "<="


def _reason(checks: list[tuple[bool, str]]) -> str:
    """Every check when all three passed (growing), else the failed ones; a rise without a tail is a step."""
    if all(ok for ok, _ in checks):
        return "; ".join(text for _, text in checks)
    reason = "; ".join(text for ok, text in checks if not ok)
    if checks[0][0] and not checks[2][0]:
        reason += " (a one-time step up, then flat)"
    return reason


def _median_slope(points: Sequence[tuple[float, float]]) -> float:
    """(median y of the later half - median y of the earlier half) / (median t apart), halves by time."""
    mid = (points[0][0] + points[-1][0]) / 2
    early = [p for p in points if p[0] < mid]
    late = [p for p in points if p[0] >= mid]
    if not early or not late:
        return 0.0
    dt = statistics.median(t for t, _ in late) - statistics.median(t for t, _ in early)
    dy = statistics.median(y for _, y in late) - statistics.median(y for _, y in early)
    return dy / dt if dt > 0 else 0.0


def _slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y) points, in y per unit of t."""
    n = len(points)
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / var if var > 0 else 0.0

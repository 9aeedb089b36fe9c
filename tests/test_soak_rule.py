"""bench/soak_rule.py's rule, ``judge(samples, warmup_s)``: a server's RSS series -> "plateau" or "growing".

Series are shaped as the soak samples them: one sample every 0.5 s for 2 minutes, the first 36 s
(30 %) warm-up. MB are MiB.
"""
from __future__ import annotations

import random

import pytest

from bench.soak_rule import MB, RISE_MB, SLOPE_MB_PER_MIN, judge

STEP_S, RUN_S, WARMUP_S = 0.5, 120.0, 36.0
TIMES = [i * STEP_S for i in range(int(RUN_S / STEP_S) + 1)]


def series(level_mb, noise_mb: float = 0.0, seed: int = 0) -> list[tuple[float, int]]:
    """[(t, rss bytes)] with ``level_mb(t)`` plus uniform noise of +-``noise_mb``."""
    rng = random.Random(seed)
    return [(t, int((level_mb(t) + rng.uniform(-noise_mb, noise_mb)) * MB)) for t in TIMES]


def allocator_noise(t: float, seed: int = 1) -> float:
    """Tens of MB up and down, as glibc's arenas do under mixed batch shapes: a few +-40 MB excursions."""
    rng = random.Random(int(t * 2) // 20 + seed)  # one level per 10 s
    return rng.choice((0.0, 0.0, 15.0, -10.0, 40.0, -25.0))


def test_flat_series_with_noise_is_a_plateau():
    for seed in range(20):
        v = judge(series(lambda t, s=seed: 900 + allocator_noise(t, s), noise_mb=20, seed=seed), WARMUP_S)
        assert v.verdict == "plateau", v.reason
        assert not v.growing
        assert 800 < v.rss_end_mb < 1000 and v.rss_peak_mb >= v.rss_end_mb


def test_steady_growth_of_1mb_per_sample_is_growing():
    v = judge(series(lambda t: 800 + t / STEP_S), WARMUP_S)  # +1 MB every 0.5 s sample: 120 MB/min
    assert v.verdict == "growing", v.reason
    assert v.slope_mb_per_min == pytest.approx(120, rel=1e-6)
    assert v.tail_slope_mb_per_min == pytest.approx(120, rel=0.02)
    assert v.rise_mb > RISE_MB
    assert v.rss_warmup_end_mb == pytest.approx(800 + WARMUP_S / STEP_S, abs=1)
    assert v.rss_end_mb == pytest.approx(800 + RUN_S / STEP_S, abs=1) == pytest.approx(v.rss_peak_mb, abs=1)


def test_growth_under_noise_is_still_caught():
    for seed in range(20):
        v = judge(series(lambda t: 800 + t / STEP_S, noise_mb=10, seed=seed), WARMUP_S)
        assert v.verdict == "growing", v.reason
    # A leak ten times faster (what --leak-control's 1 MiB per batch gives at ~1,000 batches/min) stands out
    # of the harsh noise of the flat test too.
    for seed in range(20):
        v = judge(series(lambda t, s=seed: 800 + 10 * t / STEP_S + allocator_noise(t, s), noise_mb=20, seed=seed),
                  WARMUP_S)
        assert v.verdict == "growing", v.reason


def test_climb_during_warm_up_then_flat_is_a_plateau():
    v = judge(series(lambda t: 300 + 500 * min(t, 30) / 30, noise_mb=15), WARMUP_S)  # 300 -> 800 MB in 30 s
    assert v.verdict == "plateau", v.reason
    assert v.rss_warmup_end_mb == pytest.approx(800, abs=16)
    assert v.rss_peak_mb == pytest.approx(800, abs=16)


@pytest.mark.parametrize("step_mb", [50, 200])
def test_one_time_step_after_warm_up_then_flat_is_a_plateau(step_mb):
    """Decided: a step (a cache filled once) in the middle of the judged window, then flat, is a plateau,
    whatever its size: 50 MB is under the rise limit; 200 MB is over it, but the last third is flat."""
    v = judge(series(lambda t: 800 + (step_mb if t >= 75 else 0), noise_mb=10), WARMUP_S)
    assert v.verdict == "plateau", v.reason
    assert v.tail_slope_mb_per_min < SLOPE_MB_PER_MIN
    if step_mb > RISE_MB:
        assert v.rise_mb > RISE_MB and "one-time step" in v.reason


def test_a_jump_in_the_last_samples_alone_is_not_a_trend():
    v = judge(series(lambda t: 800 + (150 if t >= 117 else 0) + t / 12, noise_mb=5), WARMUP_S)  # +5 MB/min
    assert v.verdict == "plateau", v.reason
    assert v.rss_end_mb > 940 and v.rss_peak_mb > 940


def test_a_step_in_the_middle_of_the_last_third_counts_as_growth():
    """The documented blind spot: a step there cannot be told from a leak that starts there."""
    v = judge(series(lambda t: 800 + (200 if t >= 106 else 0)), WARMUP_S)
    assert v.verdict == "growing", v.reason


def test_slow_creep_below_the_limits_is_a_plateau():
    v = judge(series(lambda t: 800 + 20 * t / 60, noise_mb=10), WARMUP_S)  # 20 MB/min
    assert v.verdict == "plateau", v.reason


def test_thresholds_can_be_given():
    s = series(lambda t: 800 + 20 * t / 60)
    assert judge(s, WARMUP_S).verdict == "plateau"
    assert judge(s, WARMUP_S, rise_mb=5, slope_mb_per_min=10).verdict == "growing"


def test_time_origin_is_the_first_sample():
    shifted = [(t + 1000.0, r) for t, r in series(lambda t: 800 + t / STEP_S)]
    assert judge(shifted, WARMUP_S) == judge(series(lambda t: 800 + t / STEP_S), WARMUP_S)


@pytest.mark.parametrize("samples", [[], [(0.0, 100 * MB)]])
def test_empty_or_single_sample_is_a_value_error(samples):
    with pytest.raises(ValueError, match="need at least 9 RSS samples"):
        judge(samples, 0.0)


def test_too_short_after_warm_up_is_a_value_error():
    short = [(t, 800 * MB) for t in TIMES[:80]]  # 39.5 s: 8 samples after a 36 s warm-up
    with pytest.raises(ValueError, match=r"need at least 9 RSS samples .* after the 36s warm-up; got 8 of 80"):
        judge(short, WARMUP_S)
    with pytest.raises(ValueError, match="got 0 of"):
        judge(series(lambda t: 800), warmup_s=RUN_S + 1)
    with pytest.raises(ValueError, match="over a time span"):
        judge([(5.0, 800 * MB)] * 20, 0.0)  # many samples, no time between them


def test_bad_inputs_are_value_errors():
    good = series(lambda t: 800)
    with pytest.raises(ValueError, match="must not go backwards"):
        judge(list(reversed(good)), 0.0)
    with pytest.raises(ValueError, match="warmup_s must be"):
        judge(good, -1.0)
    with pytest.raises(ValueError, match="RSS >= 0"):
        judge(good[:-1] + [(RUN_S + 1, -5)], 0.0)

"""calibrate_loop_decode.py: the decode step's cost recovered from a sync phase's completions."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import calibrate_loop_decode as cal  # noqa: E402


def sync_phase(lengths: list[int], a: float, b: float, t0: float = 100.0) -> list[list[float]]:
    """Every request (distinct lengths) submitted at t0; the engine steps all unfinished ones at a + b*k a step."""
    segments, t, done = [], t0, 0
    for i, length in enumerate(sorted(lengths)):
        t += (length - done) * (a + b * (len(lengths) - i))  # k running while tokens done+1..length decode
        done = length
        segments.append([t0, t, length])
    return segments


def test_the_step_cost_is_recovered_from_consecutive_completions() -> None:
    a, b = 0.004, 0.0003
    lengths = [10, 25, 40, 60, 90, 130, 180, 260]
    segments = sync_phase(lengths, a, b)
    points = cal.step_points(segments, (100.0, segments[-1][1]), min_tokens=4)
    assert [k for k, _, _ in points] == [7, 6, 5, 4, 3, 2, 1]  # the first interval (prefill) left out
    assert points[0][1] == pytest.approx(a + 7 * b)
    fa, fb = cal.fit(points)
    assert (fa, fb) == (pytest.approx(a), pytest.approx(b))
    with pytest.raises(ValueError, match="two batch sizes"):
        cal.fit(points[:1])


def test_short_intervals_and_other_phases_are_left_out() -> None:
    segments = sync_phase([10, 12, 40], 0.01, 0.0) + [[500.0, 510.0, 99]]  # a request of a later phase
    points = cal.step_points(segments, (100.0, 101.0), min_tokens=4)
    assert [k for k, _, _ in points] == [1]  # 10 -> 12 is 2 tokens (< 4): out; the later phase's request: out

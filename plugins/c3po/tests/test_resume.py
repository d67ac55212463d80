"""The per-request resume rules of the c3po trainer mode (verl-free core)."""

from __future__ import annotations

import pytest

from ring_ext_c3po.resume import Next, ResumeTracker, version_lag_counts


def test_resumed_request_asks_only_for_what_is_left_and_stops_at_max_length() -> None:
    t = ResumeTracker(max_response_length=10, max_retention=5)
    asks = [t.remaining]
    assert t.record(0, 4, "aborted", 0.0, 1.0) is Next.RESUME
    asks.append(t.remaining)
    assert t.record(1, 3, "abort", 1.0, 2.0) is Next.RESUME
    asks.append(t.remaining)
    # the last segment fills the budget: finished even though the engine says "aborted"
    assert t.record(2, 3, "aborted", 2.0, 3.0) is Next.FINISHED
    assert asks == [10, 6, 3]
    assert t.tokens == 10 and t.remaining == 0
    assert t.token_versions() == [0] * 4 + [1] * 3 + [2] * 3
    assert t.versions_spanned == 3


def test_segments_line_up_with_tokens_and_a_segment_over_budget_is_refused() -> None:
    t = ResumeTracker(max_response_length=8, max_retention=3)
    t.record(0, 5, "aborted", 0.0, 1.0)
    with pytest.raises(ValueError, match="ignored max_tokens"):
        t.record(1, 4, "stop", 1.0, 2.0)
    assert len(t.token_versions()) == t.tokens == 5


def test_retention_counts_only_aborts_that_leave_tokens_and_purges_above_sigma() -> None:
    t = ResumeTracker(max_response_length=100, max_retention=1)
    assert t.record(None, 0, "aborted", 0, 0) is Next.RESUME  # queued, no token yet: does not age
    assert t.retention == 0
    assert t.record(3, 2, "aborted", 0, 1) is Next.RESUME  # carried across one update: retention 1 == sigma, kept
    assert t.retention == 1
    assert t.record(4, 2, "aborted", 1, 2) is Next.PURGED  # a second carry: 2 > sigma
    with pytest.raises(RuntimeError, match="purged"):
        t.record(5, 1, "stop", 2, 3)


def test_sigma_zero_purges_at_the_first_carry_but_a_finished_request_is_never_purged() -> None:
    t = ResumeTracker(max_response_length=100, max_retention=0)
    assert t.record(0, 1, "aborted", 0, 1) is Next.PURGED
    done = ResumeTracker(max_response_length=100, max_retention=0)
    assert done.record(0, 7, "stop", 0, 1) is Next.FINISHED


@pytest.mark.parametrize("kwargs", [dict(max_response_length=0, max_retention=1),
                                    dict(max_response_length=4, max_retention=-1)])
def test_bad_bounds_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ResumeTracker(**kwargs)


def test_a_segment_with_tokens_but_no_version_is_refused() -> None:
    with pytest.raises(ValueError, match="no weight version"):
        ResumeTracker(4, 1).record(None, 2, "stop", 0, 1)


def test_version_lag_counts_tokens_per_lag_and_refuses_future_tokens() -> None:
    assert version_lag_counts([[3, 5, 0, 1], [4, 2, 1, 2], [4, 1, 2, 3]], policy_version=4) == {0: 3, 1: 5}
    with pytest.raises(ValueError, match="newer"):
        version_lag_counts([[5, 1, 0, 1]], policy_version=4)

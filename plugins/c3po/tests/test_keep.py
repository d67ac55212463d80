"""carry: keep, the parts without an engine (ring_ext_c3po.keep): a kept request's tokens split per weight version."""

from __future__ import annotations

import pytest

from ring_ext_c3po.keep import split_at_switches
from ring_ext_c3po.resume import Next, ResumeTracker


def test_a_request_kept_across_two_syncs_gets_three_versions() -> None:
    # decoded 5 tokens under version 3, 0 more before the next sync (a queued request), then 4 under version 5
    pieces = split_at_switches(9, 5, [[3, 5, 10.0], [4, 5, 12.0]], 1.0, 20.0)
    assert pieces == [(3, 5, 1.0, 10.0), (4, 0, 10.0, 12.0), (5, 4, 12.0, 20.0)]
    assert split_at_switches(7, 2, None, 1.0, 2.0) == [(2, 7, 1.0, 2.0)]  # never kept: one piece


def test_switches_out_of_order_are_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        split_at_switches(4, 2, [[1, 3, 1.0], [2, 2, 2.0]], 0.0, 3.0)  # a count that goes back
    with pytest.raises(ValueError, match="outside"):
        split_at_switches(4, 2, [[1, 6, 1.0]], 0.0, 3.0)  # more tokens than the request returned


def test_the_client_records_kept_pieces_as_cuts_and_purges_past_sigma() -> None:
    """The client feeds the pieces to the tracker as it does abort segments: each sync a request was kept across
    while holding tokens ages it (rules.after_cut), a switch before its first token does not."""
    tracker = ResumeTracker(max_response_length=64, max_retention=1)
    pieces = split_at_switches(9, 5, [[3, 0, 10.0], [4, 5, 12.0]], 1.0, 20.0)
    outcomes = [tracker.record(v, n, "abort", a, b) for v, n, a, b in pieces[:-1]]
    assert outcomes == [Next.RESUME, Next.RESUME] and tracker.retention == 1
    assert tracker.record(pieces[-1][0], pieces[-1][1], "stop", pieces[-1][2], pieces[-1][3]) is Next.FINISHED
    assert tracker.token_versions() == [4] * 5 + [5] * 4
    over = ResumeTracker(max_response_length=64, max_retention=1)
    kept_twice = split_at_switches(9, 5, [[3, 2, 10.0], [4, 5, 12.0]], 1.0, 20.0)
    assert [over.record(v, n, "abort", a, b) for v, n, a, b in kept_twice[:-1]] == [Next.RESUME, Next.PURGED]


def test_the_keep_cut_is_a_method_of_verls_server_with_its_own_signature() -> None:
    """Ray reads an actor method's signature through inspect.unwrap, so a wrapper with new arguments would be
    called with the original's: the keep cut is a method of its own on verl's real server class."""
    import inspect

    import verl  # noqa: F401  (loads the plugins)
    from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer

    method = inspect.unwrap(vLLMHttpServer.pause_keeping_requests)
    assert list(inspect.signature(method).parameters) == ["self", "max_retention"]
    assert "carry" not in inspect.signature(inspect.unwrap(vLLMHttpServer.abort_all_requests)).parameters

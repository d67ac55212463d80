"""The adaptive cut (ring_ext_c3po.adaptive): when letting the in-flight requests finish beats cutting them."""

from __future__ import annotations

import pytest

from ring_ext_c3po.adaptive import CutCosts, decode_token_s, expected_remaining, wait_s
from ring_ext_c3po.rules import training_batch


def test_expected_remaining_conditions_on_what_a_request_already_decoded() -> None:
    finished = [10, 20, 30, 200]
    assert expected_remaining(0, 256, finished) == pytest.approx(65.0)  # the mean length
    assert expected_remaining(25, 256, finished) == pytest.approx((30 + 200) / 2 - 25)  # only longer ones count
    assert expected_remaining(25, 100, finished) == pytest.approx((30 + 100) / 2 - 25)  # the cap clips the tail
    assert expected_remaining(210, 256, finished) == 46.0  # longer than all seen: only the cap bounds it
    with pytest.raises(ValueError, match="outside"):
        expected_remaining(300, 256, finished)


def test_waits_only_when_the_slowest_request_is_expected_sooner_than_a_cut() -> None:
    finished = [30] * 50 + [34] * 50  # a light tail: every request ends near 32 tokens
    near_done = [(28, 256), (31, 256)]  # expected 4 and 1 more tokens
    assert wait_s(near_done, finished, token_s=0.01, cut_s=0.3) == pytest.approx(0.04)
    just_admitted = [*near_done, (1, 256)]  # 31 more tokens, 0.31 s > 0.3 s: the cut is cheaper
    assert wait_s(just_admitted, finished, token_s=0.01, cut_s=0.3) is None
    assert wait_s(near_done, finished, token_s=0.01, cut_s=0.03) is None  # a cheap cut (carry=keep): cut
    assert wait_s([], finished, token_s=0.01, cut_s=0.3) == 0.0  # nothing in flight
    # a request that holds no token yet loses nothing to a cut (resubmitted or kept as it is): it does not count
    assert wait_s([*near_done, (0, 256)], finished, token_s=0.01, cut_s=0.3) == pytest.approx(0.04)
    assert wait_s([(0, 256)], finished, token_s=None, cut_s=None) == 0.0
    assert wait_s(near_done, finished, token_s=None, cut_s=0.3) is None  # nothing measured yet: cut
    assert wait_s(near_done, finished, token_s=0.01, cut_s=None) is None


def test_costs_average_what_was_measured_and_skip_cut_requests_decode_time() -> None:
    costs = CutCosts()
    assert costs.cut_s is None and costs.token_s is None  # nothing measured yet: the gate cuts at once
    costs.finished(30, 0.3)
    costs.finished(34, None)  # a request that was cut: its time spans the training, not counted
    costs.finished(10, 0.1)
    costs.cut(0.2)
    costs.cut(0.4)
    assert costs.token_s == pytest.approx(0.4 / 40) and costs.cut_s == pytest.approx(0.3)
    assert list(costs.lengths) == [30, 34, 10]


def test_the_decode_rate_is_read_from_two_progress_reads() -> None:
    before = {"a": (10, 256), "b": (3, 256), "c": (0, 256), "gone": (5, 256)}
    after = {"a": (14, 256), "b": (5, 256), "c": (0, 256), "new": (1, 256)}  # c queued, gone finished, new arrived
    assert decode_token_s(before, after, 0.02) == pytest.approx(0.02 / 4)  # median of 100 and 200 tokens/s: 200
    assert decode_token_s(before, {"c": (0, 256)}, 0.02) is None  # nothing decoded in between


def test_a_skipped_cut_trains_every_finished_group() -> None:
    """What the buffer does after a skipped cut: all finished groups are `carried` into training_batch, so the ones
    that finished while the gate waited are trained now, not deferred (a deferred group with an older token could
    exceed sigma and be purged)."""
    finished = [("a", 0, 100), ("b", 1, 100), ("c", 2, 100)]
    assert training_batch(finished, 150) == ["a", "b"]  # an instant cut: c waits for the next step
    assert sorted(training_batch(finished, 150, {"a", "b", "c"})) == ["a", "b", "c"]


class Server:
    """Stands in for verl's `vLLMHttpServer` actor (a vLLM engine behind it): the requests in it, id -> (decoded,
    cap), and the cut, which records what it stopped. After `done_after` polls the crossing's requests finish by
    themselves and a request admitted after the crossing arrives."""

    def __init__(self, progress: dict[str, tuple[int, int]], done_after: int | None) -> None:
        self.progress, self.done_after, self.polls, self.stopped = dict(progress), done_after, 0, []

    async def in_flight_progress(self) -> list[list]:
        self.polls += 1
        if self.done_after is not None and self.polls > self.done_after:
            self.progress = {"late": (1, 256)}
        return [[rid, t, cap] for rid, (t, cap) in self.progress.items()]

    async def abort_all_requests(self) -> None:
        self.stopped.append(sorted(self.progress))
        self.progress = {}


def _crossing(progress: dict[str, tuple[int, int]], done_after: int | None) -> tuple[bool, dict, Server]:
    """A gate whose run measured 0.01 s per token and 0.3 s per cut sees the crossing completion; the trainer's cut
    then waits on `settle`."""
    import asyncio

    from test_same_prompt import Remote

    from ring_ext_c3po.gate import BudgetGate

    async def run() -> tuple[bool, dict, Server]:
        server = Server(progress, done_after)
        gate = BudgetGate(group_size=1, token_budget=100, servers=[Remote(server)], adaptive=True)
        gate.costs.cut(0.3)
        for _ in range(20):
            gate.costs.finished(32, 0.32)
        await gate.finished("crossing", 100, (0, 0), 1.0)
        skipped = await gate.settle()
        return skipped, gate.next_phase(), server

    return asyncio.run(run())


def test_the_gate_lets_nearly_done_requests_finish_and_cuts_far_ones() -> None:
    skipped, seen, server = _crossing({"a": (28, 256), "b": (30, 256)}, done_after=3)  # done within a few polls
    assert skipped and seen["c3po/cut_skipped"] == 1.0 and 0 < seen["c3po/cut_wait_s"] < 0.3
    assert server.stopped == [["late"]]  # the cut then stops only what arrived after the crossing
    skipped, seen, server = _crossing({"a": (28, 256), "b": (1, 256)}, done_after=3)  # b: 0.31 s expected
    assert not skipped and seen["c3po/cut_skipped"] == 0.0 and seen["c3po/cut_wait_s"] < 0.1  # 2 reads, 20 ms apart
    assert server.stopped == [["a", "b"]]  # cut at once


def test_a_wait_that_outlasts_the_cut_cost_ends_in_the_cut() -> None:
    skipped, seen, server = _crossing({"a": (28, 256)}, done_after=None)  # expected to finish, never does
    assert not skipped and seen["c3po/cut_skipped"] == 0.0 and server.stopped == [["a"]]
    assert 0.3 <= seen["c3po/cut_wait_s"] < 0.6  # waited what a cut costs, then cut


def test_the_progress_read_is_a_method_of_verls_server() -> None:
    """The gate calls `in_flight_progress` on verl's rollout server actors: the plugin adds it to the real class."""
    import inspect

    import verl  # noqa: F401  (loads the plugins)
    from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer

    assert list(inspect.signature(inspect.unwrap(vLLMHttpServer.in_flight_progress)).parameters) == ["self"]


def test_admission_stops_at_what_the_budget_needs_and_one() -> None:
    from ring_ext_c3po.adaptive import groups_to_admit

    # 400 tokens to go at 100 a group: 4 groups and a spare, 2 already in flight -> 3, within Omega's room of 30
    assert groups_to_admit(600, 2, 100.0, 1000, pool=32) == 3
    assert groups_to_admit(600, 5, 100.0, 1000, pool=32) == 0  # in flight already enough
    assert groups_to_admit(600, 30, 100.0, 1000, pool=32) == 0
    assert groups_to_admit(1200, 0, 100.0, 1000, pool=32) == 1  # the budget met: the spare only (never stuck)
    assert groups_to_admit(0, 0, 100.0, 5000, pool=8) == 8  # Omega still caps it
    assert groups_to_admit(0, 3, None, 1000, pool=8) == 5  # the first phase: a group's size is not known yet

"""Admission at the completion event (ring_ext_c3po.admission, and the budget gate that holds the waiting requests)."""

from __future__ import annotations

import asyncio

import pytest

from ring_ext_c3po.admission import Admission
from ring_ext_c3po.gate import BudgetGate


def test_a_group_enters_whole_when_a_slot_frees_oldest_first() -> None:
    adm = Admission(slots=4, group_size=2)
    for group in ("a", "a", "b", "b", "c", "c"):
        assert not adm.arrive(group)  # nothing enters before admit() looks at the slots
    assert adm.admit() == ["a", "b"] and adm.requests_inside == 4 and adm.groups_waiting == 1
    assert adm.admit() == []  # full: c waits
    adm.leave("a")  # one request of a finished: its slot goes to c at once, with both of c's requests
    assert adm.admit() == ["c"] and adm.requests_inside == 5  # c's second request queues in the engine briefly
    adm.leave("a")
    assert adm.groups_inside == 2 and adm.requests_inside == 4


def test_a_group_admitted_before_all_its_requests_arrived_keeps_their_slots() -> None:
    adm = Admission(slots=4, group_size=2)
    adm.arrive("a"), adm.arrive("a"), adm.arrive("b")  # b's second request is still on its way
    assert adm.admit() == ["a", "b"] and adm.requests_inside == 4  # b's late request has its slot kept
    adm.arrive("c")
    assert adm.admit() == []  # so c does not take it: the engine never holds more than its batch
    assert adm.arrive("b") and adm.requests_inside == 4  # the late request goes in at once, on its slot
    adm.arrive("d")
    adm.leave("a"), adm.leave("a")
    assert adm.admit() == ["c"] and adm.requests_inside == 4  # c enters whole: one in, one slot kept
    adm.leave("b")
    assert adm.admit() == ["d"] and adm.requests_inside == 5
    adm.leave("c")  # c's only request that came finished; its second never comes (its agent loop failed)
    assert adm.requests_inside == 4
    adm.expire()  # at the phase's end the slot kept for it is freed; d's is kept (d has a request inside)
    assert adm.requests_inside == 3 and adm.groups_inside == 2


def test_closed_admission_holds_every_group_and_a_limit_caps_groups_inside() -> None:
    adm = Admission(slots=8, group_size=1)
    for group in "abcd":
        adm.arrive(group)
    adm.open = False  # from the crossing until generation resumes
    assert adm.admit() == []
    adm.open = True
    assert adm.admit(max_groups_inside=2) == ["a", "b"]  # the adaptive cut's limit: what the budget needs
    assert adm.admit(max_groups_inside=3) == ["c"]
    assert adm.drop_waiting() == ["d"] and adm.groups_waiting == 0


def test_bad_accounting_is_an_error_not_a_leaked_slot() -> None:
    with pytest.raises(ValueError, match="slots >= 1"):
        Admission(slots=0, group_size=2)
    adm = Admission(slots=2, group_size=2)
    with pytest.raises(ValueError, match="none of its requests was inside"):
        adm.leave("never-admitted")


def _gate(adaptive: bool = False) -> BudgetGate:
    # group_size 2, Phi 100, 4 sequence slots; no rollout server: nothing here cuts an engine
    return BudgetGate(group_size=2, token_budget=100, servers=[], capacity=4, adaptive=adaptive,
                      admission="completion")


def test_the_gate_hands_a_freed_slot_on_at_the_completion_and_closes_at_the_crossing() -> None:
    async def run() -> None:
        gate = _gate()
        inside = [asyncio.ensure_future(gate.admit(g)) for g in ("a", "a", "b", "b")]
        waiting = [asyncio.ensure_future(gate.admit("c")) for _ in range(2)]
        await asyncio.sleep(0)
        assert all([await t for t in inside]) and not any(t.done() for t in waiting)
        await gate.finished("a", 10)
        gate.leave("a")  # the completion itself admits c: no poll in between
        await asyncio.sleep(0)
        assert all(t.done() and t.result() for t in waiting)
        late = asyncio.ensure_future(gate.admit("d"))  # 5 requests inside, 4 slots: d waits
        await gate.finished("a", 90)  # group a complete: C = 100 = Phi, the crossing
        gate.leave("a")
        gate.purged("b")
        for _ in range(2):
            gate.leave("b")  # 2 requests inside (c's), but admission is closed: what enters now would only be cut
        await asyncio.sleep(0.01)
        assert not late.done()
        assert gate.next_phase()["c3po/groups_waiting_at_cut"] == 1.0
        gate.open()  # generation resumed under the new weights
        await asyncio.sleep(0)
        assert late.done() and late.result()
        assert await gate.admit("d")  # d's sibling enters at once: 4 requests inside
        ended = asyncio.ensure_future(gate.admit("e"))
        await asyncio.sleep(0)
        assert not ended.done()
        gate.close()  # the run ended: what still waits ends without decoding
        await asyncio.sleep(0)
        assert ended.result() is False

    asyncio.run(run())


def test_under_the_adaptive_cut_the_gate_admits_only_what_the_budget_needs() -> None:
    async def run() -> None:
        gate = _gate(adaptive=True)
        gate.admission.slots = 100  # slots never bind here: only the budget's need does
        first = [asyncio.ensure_future(gate.admit(g)) for g in ("a", "a")]
        await asyncio.sleep(0)
        assert all([await t for t in first])  # no group size known yet: the limit is the waiting groups' room
        for _ in range(2):
            await gate.finished("a", 20)  # a: 40 tokens, the run's mean group so far; C = 40
            gate.leave("a")
        more = {g: asyncio.ensure_future(gate.admit(g)) for g in "bcdef"}
        await asyncio.sleep(0)
        # 60 tokens to go at 40 a group: 2 groups and a spare
        assert [g for g, t in more.items() if t.done()] == ["b", "c", "d"]
        assert await gate.admit("b")  # b's second request
        await gate.finished("b", 20)
        await gate.finished("b", 20)  # C = 80: 20 to go, 1 group and a spare, c and d inside already
        gate.leave("b")
        gate.leave("b")
        await asyncio.sleep(0)
        assert [g for g, t in more.items() if t.done()] == ["b", "c", "d"]
        gate.close()
        await asyncio.sleep(0)
        assert [more[g].result() for g in "ef"] == [False, False]

    asyncio.run(run())


def test_validation_samples_are_told_apart_from_training_ones() -> None:
    """A validation request never waits for admission (it is no budget's); the client learns which it is from verl's
    `trajectory["validate"]`, passed to `AgentLoopWorker._run_agent_loop` by keyword (v1) or by position."""
    from ring_ext_c3po import identity

    async def original(self, sampling_params, trajectory=None, **kwargs):  # verl's signature, its body stubbed
        return identity.request_identity("prompt-hash"), identity.is_validation()

    before = identity._original_run
    wrapped = identity.identify_requests(original)
    try:
        assert asyncio.run(wrapped(None, {}, trajectory={"validate": True}, uid="u1", session_id=0)) == (
            ("u1", "0"), True)
        assert asyncio.run(wrapped(None, {}, {"validate": False}, uid="u2", session_id=1)) == (("u2", "1"), False)
        assert identity.is_validation() is False  # outside an agent loop
    finally:
        identity._original_run = before

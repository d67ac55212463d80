"""Where a rollout phase's time goes (ring_ext_c3po.phase_stats, verl-free) and the gate that holds it."""

from __future__ import annotations

import asyncio

import pytest

from ring_ext_c3po.gate import BudgetGate
from ring_ext_c3po.phase_stats import PhaseStats


def test_occupancy_is_time_averaged_and_capped_at_the_engine_batch() -> None:
    s = PhaseStats(capacity=2)
    s.open(10.0)
    s.segment(9.0, 14.0, fresh=True, finished=True)  # parked before the opening: counts from it, 10-14
    s.segment(10.0, 12.0, fresh=True, finished=True)  # 10-12
    s.segment(10.0, 18.0, fresh=True, finished=False)  # 10-18, but the cut is at 16
    s.segment(17.0, 19.0, fresh=True, finished=False)  # after the cut: not this phase's
    s.cut(16.0)
    # 10-12: 3 in flight, capped at 2 -> 2; 12-14: 2; 14-16: 1 -> (2*2 + 2*2 + 1*2) / (2 * 6)
    assert s.occupancy() == pytest.approx(10 / 12)
    full = PhaseStats(capacity=1)
    full.open(0.0)
    full.segment(0.0, 5.0, fresh=True, finished=True)
    full.cut(5.0)
    assert full.occupancy() == 1.0


def test_no_window_no_occupancy() -> None:
    s = PhaseStats(capacity=4)
    s.segment(0.0, 1.0, fresh=True, finished=True)
    assert s.occupancy() is None and "c3po/engine_occupancy" not in s.summary()  # never opened, never cut
    with pytest.raises(ValueError, match="capacity >= 1"):
        PhaseStats(capacity=0)
    with pytest.raises(ValueError, match="ends"):
        s.segment(2.0, 1.0, fresh=True, finished=True)


def test_cut_cost_is_the_crossing_to_the_last_cut_request_back() -> None:
    s = PhaseStats(capacity=4)
    s.open(0.0)
    s.segment(0.0, 3.0, fresh=True, finished=True)  # the crossing completion
    s.cut(3.0)
    s.segment(0.5, 3.2, fresh=True, finished=False)  # aborted: back 0.2 s after the crossing
    s.segment(1.0, 3.5, fresh=True, finished=False)  # the slowest to stop
    assert s.summary()["c3po/cut_s"] == pytest.approx(0.5)


def test_reprefill_counts_what_resumed_requests_carry_and_admission_latency_matches_in_order() -> None:
    s = PhaseStats(capacity=4)
    s.open(0.0)
    s.segment(0.0, 1.0, fresh=True, finished=True)  # completes at 1.0
    s.segment(0.0, 2.0, fresh=True, finished=True)  # completes at 2.0
    s.segment(1.25, 3.0, fresh=True, finished=False)  # takes the first freed slot 0.25 s later
    s.segment(2.5, 3.0, fresh=True, finished=False)  # the second, 0.5 s later
    s.segment(2.6, 3.0, fresh=False, finished=False, reprefill_tokens=40)  # a resubmission: no admission
    s.segment(2.7, 3.0, fresh=True, finished=False)  # no completion left to match
    s.cut(3.0)
    out = s.summary()
    assert out["c3po/admission_latency_s"] == pytest.approx((0.25 + 0.5) / 2)
    assert out["c3po/reprefill_tokens"] == 40.0


def test_gate_reports_a_phase_and_starts_the_next_clean() -> None:
    """The gate's own crossing cuts the phase; its stats go out with next_phase and the next phase starts empty
    (no rollout server: the abort it sends is verl's, exercised by the end-to-end runs)."""
    gate = BudgetGate(group_size=1, token_budget=10, servers=[], max_retention=1, capacity=2)
    gate.open()
    asyncio.run(gate.finished("g", 10, (0, 0)))
    cut_at = gate.stats.cut_at
    assert cut_at is not None
    gate.segment(cut_at - 1.0, cut_at + 0.5, True, False)  # in flight at the crossing, back 0.5 s later
    gate.mark_cut()  # the trainer's later cut does not move the gate's
    assert gate.stats.cut_at == cut_at
    seen = gate.next_phase(0)
    assert seen["c3po/gate_cut"] == 1.0 and seen["c3po/cut_s"] == pytest.approx(0.5)
    assert seen["c3po/engine_occupancy"] == pytest.approx(0.5)  # one of two slots busy from the opening to the cut
    assert gate.stats.cut_at is None and gate.stats.opened_at is None and gate.cut_at is None
    gate.open()
    gate.mark_cut()  # no crossing: the trainer's cut ends the phase
    assert gate.next_phase(0)["c3po/gate_cut"] == 0.0
    gate.close()
    assert gate.is_closed()


def test_a_segment_kept_across_the_sync_counts_in_both_phases() -> None:
    """carry: keep holds requests in the engine across the sync: their segments come back only in the next phase,
    yet they decoded in this one. Counted from `began` to the cut here, and from the opening in the next phase."""
    gate = BudgetGate(group_size=1, token_budget=10, servers=[], max_retention=1, capacity=2)
    gate.open()
    opened = gate.stats.opened_at
    gate.began("kept:0", opened)  # decodes through the whole phase, kept at the cut
    gate.began("done:0", opened)
    asyncio.run(gate.finished("g", 10, (0, 0)))
    cut_at = gate.stats.cut_at
    gate.segment(opened, cut_at, True, True, key="done:0")
    seen = gate.next_phase(0)
    assert seen["c3po/engine_occupancy"] == pytest.approx(1.0)  # both slots busy to the cut: the kept one counts
    gate.open()
    reopened = gate.stats.opened_at
    gate.segment(opened, reopened + 1.0, False, True, key="kept:0")  # back 1 s into the next phase
    gate.mark_cut()
    gate.stats.cut_at = reopened + 2.0  # the next phase's window: 2 s, one of two slots busy for 1 s
    assert gate.next_phase(0)["c3po/engine_occupancy"] == pytest.approx(0.25)
    assert gate.stats.next_phase()._open == {}  # nothing left in flight


def test_an_unreported_segment_is_in_flight_up_to_the_cut() -> None:
    s = PhaseStats(capacity=2)
    s.open(0.0)
    s.began("a", 1.0)
    s.began("b", 0.0)
    s.segment(0.0, 2.0, fresh=True, finished=True, key="b")
    s.cut(4.0)
    assert s.occupancy() == pytest.approx((3.0 + 2.0) / 8.0)  # a: 1-4, b: 0-2
    assert set(s.next_phase()._open) == {"a"}


def test_report_delay_is_the_client_return_to_the_gate() -> None:
    s = PhaseStats(capacity=2)
    s.segment(0.0, 1.0, fresh=True, finished=True, received=1.25)
    s.segment(0.0, 2.0, fresh=True, finished=False, received=2.75)
    s.segment(0.0, 3.0, fresh=True, finished=False)  # no receipt time: not counted
    out = s.summary()
    assert out["c3po/report_delay_s"] == pytest.approx(0.5) and out["c3po/report_delay_max_s"] == pytest.approx(0.75)

"""One rule set: the reference scheduler (which the simulator drives) and the verl trainer mode's pieces take the
same decisions on the same events.

The trainer side is modelled as the adapter uses the rules, without verl: one `ResumeTracker` per request (the
client: resume budget, ageing, purge), one `GroupBudget` keyed by group (the gate: the crossing completion cuts
the phase), `rules.top_up` for admissions and `rules.training_batch` over the finished groups (the buffer); a group
is purged when any of its requests' tracker answers PURGED. One engine (FIFO queue, `concurrency` running
requests, one token per running request per step) is fed both sides' requests in lockstep; every answer is
compared as it is given, and per iteration: admissions, the crossing completion, the batch (prompt ids, tokens,
version lag), the purged groups, the retention of every carried request and the resume budgets asked."""

from __future__ import annotations

import itertools
import random
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from ring_ext_c3po.resume import Next, ResumeTracker, version_lag_counts
from ring_ext_c3po.rules import C3POConfig, GroupBudget, top_up, training_batch
from ring_ext_c3po.scheduler import C3POScheduler

Key = tuple[str, int]  # (prompt id, sample index): both sides' name for a request
Ask = tuple[str, int, int, int]  # (prompt id, sample index, tokens held, tokens asked = resume budget)


def stream() -> Iterator[str]:
    return (f"p{i:04d}" for i in itertools.count())  # zero-padded: string order is stream order


@dataclass(frozen=True)
class Phase:
    admitted: tuple[int, ...]  # new groups per top-up, in call order
    asks: tuple[tuple[Ask, ...], ...]  # requests per top-up, sorted
    crossing: tuple[int, Key | None]  # (decode step, request) of the completion that brought C to Phi; (0, None):
    # what finished after the previous crossing already held Phi
    late: int  # completions of the crossing's decode step after it (trained first in the next phase)
    trained: tuple[str, ...]  # the batch, in order
    trained_tokens: int
    version_lag: dict[int, int]
    purged: frozenset[str]
    retention: dict[Key, int]  # every carried (unfinished) request


class SchedulerSide:
    def __init__(self, knobs: C3POConfig, group_size: int, max_len: int) -> None:
        self.s = C3POScheduler(knobs, stream(), group_size=group_size, max_response_length=max_len)
        self.uid: dict[Key, str] = {}
        self.seen: set[str] = set()

    def submit(self) -> tuple[int, list[Ask]]:
        asks = []
        for r in self.s.pending_requests():
            self.uid[r.prompt_id, r.sample_index] = r.uid
            asks.append((r.prompt_id, r.sample_index, len(r.prefix_tokens), r.max_new_tokens))
        new = {p for p, *_ in asks} - self.seen
        self.seen |= new
        return len(new), sorted(asks)

    @property
    def reached(self) -> bool:
        return self.s.budget_reached

    def finish(self, key: Key, tokens: int) -> bool:
        return self.s.record(self.uid[key], [7] * tokens, [-0.5] * tokens, finished=True)

    def cut(self, key: Key, tokens: int) -> None:
        if tokens:  # a request cut while queued returns nothing
            self.s.record(self.uid[key], [7] * tokens, [-0.5] * tokens, finished=False)

    def end(self) -> tuple[list[str], int, dict[int, int], set[str], dict[Key, int]]:
        self.s.abort_in_flight()
        res = self.s.end_iteration()
        retention = {(t["prompt_id"], t["sample_index"]): t["retention"] for g in self.s.state_dict()["inference_pool"]
                     for t in g["trajectories"] if not t["finished"]}
        return ([g[0].prompt_id for g in res.batch], res.trained_tokens, res.version_lag, set(res.purged_prompt_ids),
                retention)


@dataclass
class _Group:
    prompt_id: str
    dispatched: int  # the buffer's prompt_global_steps
    trackers: list[ResumeTracker]
    submitted: set[int] = field(default_factory=set)  # sample indices with a request in this phase


class TrainerSide:
    def __init__(self, knobs: C3POConfig, group_size: int, max_len: int) -> None:
        self.knobs, self.group_size, self.max_len = knobs, group_size, max_len
        self.gate = GroupBudget(group_size, knobs.token_budget)
        self.prompts, self.version = stream(), 0
        self.in_flight: dict[str, _Group] = {}  # pending or running groups (a sample not finished)
        self.finished: dict[str, _Group] = {}  # whole, unpurged groups waiting for the batch
        self.purged: set[str] = set()
        self.carried: frozenset[str] = frozenset()  # finished after the last crossing: all trained next

    @property
    def reached(self) -> bool:
        return self.gate.reached

    def submit(self) -> tuple[int, list[Ask]]:
        new = top_up(len(self.in_flight), self.knobs.pool_prompts, reached=self.gate.reached)
        for _ in range(new):
            pid = next(self.prompts)
            trackers = [ResumeTracker(self.max_len, self.knobs.max_retention) for _ in range(self.group_size)]
            self.in_flight[pid] = _Group(pid, self.version, trackers)
        if self.gate.reached:
            return new, []  # the gate aborted the engine: nothing is (re)submitted until the weight sync
        asks = []
        for pid, g in self.in_flight.items():
            for i, t in enumerate(g.trackers):
                if t.outcome is not Next.FINISHED and i not in g.submitted:
                    g.submitted.add(i)
                    asks.append((pid, i, t.tokens, t.remaining))
        return new, sorted(asks)

    def finish(self, key: Key, tokens: int) -> bool:
        pid, i = key
        g = self.in_flight[pid]
        t = g.trackers[i]
        reason = "length" if tokens == t.remaining else "stop"
        assert t.record(self.version, tokens, reason, 0.0, 1.0) is Next.FINISHED
        if all(x.outcome is Next.FINISHED for x in g.trackers):
            self.finished[pid] = self.in_flight.pop(pid)
        return self.gate.finish(pid, t.tokens)  # the client reports the request's whole length

    def cut(self, key: Key, tokens: int) -> None:
        pid, i = key
        g = self.in_flight.get(pid)
        if g is None:
            return  # a sibling already purged the group (the client's purge mark stops this request too)
        step = g.trackers[i].record(self.version if tokens else None, tokens, "abort", 0.0, 1.0)
        assert step is not Next.FINISHED  # the engine completes a request that reaches its budget, never cuts it
        if step is Next.PURGED:
            del self.in_flight[pid]
            self.gate.purge(pid)
            self.purged.add(pid)

    def end(self) -> tuple[list[str], int, dict[int, int], set[str], dict[Key, int]]:
        # A carried request the gate kept from this phase's top-up was still resubmitted by its client (the client's
        # resume loop does not ask the gate) and cut by this abort with no new token: it ages like any other.
        for pid, g in list(self.in_flight.items()):
            for i, t in enumerate(g.trackers):
                if t.outcome is not Next.FINISHED and i not in g.submitted and pid in self.in_flight:
                    self.cut((pid, i), 0)
        # the buffer orders finished groups by completion (self.finished is filled in completion order)
        rows = [(pid, i, sum(t.tokens for t in g.trackers)) for i, (pid, g) in enumerate(self.finished.items())]
        batch = training_batch(rows, self.knobs.token_budget, self.carried)
        batch = batch if batch is not None else [pid for pid, *_ in rows]  # the prompts ran out: train what finished
        rows = [r for r in rows if r[0] in set(batch)]
        lag: Counter[int] = Counter()
        for pid in batch:
            for t in self.finished[pid].trackers:
                lag.update(version_lag_counts([s.to_list() for s in t.segments], self.version))
        purged, self.purged = self.purged, set()
        self.finished = {pid: g for pid, g in self.finished.items() if pid not in set(batch)}  # after the crossing
        self.carried = frozenset(self.finished)
        self.gate.reset(sum(t.tokens for g in self.finished.values() for t in g.trackers))  # they count first
        self.version += 1
        for g in self.in_flight.values():
            g.submitted.clear()
        retention = {(pid, i): t.retention for pid, g in self.in_flight.items() for i, t in enumerate(g.trackers)
                     if t.outcome is not Next.FINISHED}
        return batch, sum(tokens for *_, tokens in rows), dict(sorted(lag.items())), purged, retention


def run(seed: int, sigma: int, group_size: int, pool: int, iterations: int = 6) -> list[Phase]:
    rng = random.Random(seed)
    max_len = rng.randint(4, 16)
    concurrency = rng.randint(1, pool * group_size - 1) if pool * group_size > 1 else 1
    # Phi up to a quarter of a full pool: phases short against the longest requests, which are then carried
    knobs = C3POConfig(token_budget=rng.randint(1, pool * group_size * max_len // 4 + 1), max_retention=sigma,
                       pool_prompts=pool)
    lengths: dict[Key, int] = {}  # seeded per sample; a quarter hit the length cap

    def length(key: Key) -> int:
        if key not in lengths:
            lengths[key] = max_len if rng.random() < 0.25 else rng.randint(1, max_len)
        return lengths[key]

    sides = SchedulerSide(knobs, group_size, max_len), TrainerSide(knobs, group_size, max_len)
    phases = []
    for _ in range(iterations):
        queue: deque[tuple[Key, int]] = deque()  # (request, tokens it will generate in this phase)
        running: dict[Key, list[int]] = {}  # request -> [generated this phase, goal]
        admitted, asked, crossing, step, late = [], [], None, 0, 0

        def top_up_both() -> None:
            (na, a), (nb, b) = (side.submit() for side in sides)
            assert (na, a) == (nb, b), f"admissions differ at step {step}: scheduler {na} {a}, trainer {nb} {b}"
            if a:
                admitted.append(na)
                asked.append(tuple(a))
            for pid, i, held, budget in a:
                goal = length((pid, i)) - held
                assert 1 <= goal <= budget == max_len - held  # the resume budget asked is what is left
                queue.append(((pid, i), goal))

        top_up_both()
        assert sides[0].reached == sides[1].reached
        if sides[0].reached:  # groups that finished after the last crossing already hold Phi: cut at once
            crossing = (0, None)
        while crossing is None:
            while queue and len(running) < concurrency:
                key, goal = queue.popleft()
                running[key] = [0, goal]
            assert running, "no progress"
            step += 1
            done = []
            for key, entry in running.items():
                entry[0] += 1
                if entry[0] == entry[1]:
                    done.append(key)
            for key in sorted(done):  # every completion of this decode step, then the cut if one crossed
                goal = running.pop(key)[1]
                fired = [side.finish(key, goal) for side in sides]
                assert fired[0] == fired[1], f"crossing differs at {key}, step {step}: {fired}"
                late += crossing is not None
                if fired[0]:
                    assert crossing is None  # fires once per phase
                    crossing = (step, key)
            if crossing is None:
                top_up_both()  # a group that left the pool frees room
        for key, (generated, _) in sorted(running.items()):  # the abort: running requests return partial tokens
            for side in sides:
                side.cut(key, generated)
        for key, _ in queue:  # queued ones return nothing
            for side in sides:
                side.cut(key, 0)
        a, b = (side.end() for side in sides)
        assert a == b, f"iteration {len(phases)} differs:\nscheduler {a}\ntrainer   {b}"
        trained, tokens, lag, purged, retention = a
        assert tokens >= knobs.token_budget and (crossing[1] is None or crossing[1][0] in trained)  # crossing group
        assert all(r <= sigma for r in retention.values())
        phases.append(Phase(tuple(admitted), tuple(asked), crossing, late, tuple(trained), tokens, lag,
                            frozenset(purged), retention))
    return phases


CASES = [(seed, sigma, g, pool)
         for sigma in (0, 1, 2) for g in (1, 2, 3) for pool in (1, 2, 3, 4) for seed in (0, 1, 2)]


@pytest.mark.parametrize("sigma", [0, 1, 2])
def test_scheduler_and_trainer_mode_take_the_same_decisions(sigma: int) -> None:
    flat = [p for case in CASES if case[1] == sigma for p in run(*case)]
    # The sequences exercise every rule, so agreement is not vacuous: purges, requests carried at retention sigma
    # and carried without ageing, completions after the crossing in its decode step (overshoot), top-ups in the
    # middle of a phase, resumes (a request asking for less than a full budget) and stale tokens trained.
    assert sum(len(p.purged) for p in flat) > 0
    assert any(r == 0 for p in flat for r in p.retention.values())
    assert any(p.late for p in flat)
    assert any(len(p.admitted) > 1 for p in flat)
    # Per-request ageing on both sides: a finished sample that waited for a sibling cut while queued (not aged)
    # is trained with tokens older than sigma (at sigma 2 these sequences hold no such wait across 3 updates).
    if sigma < 2:
        assert any(max(p.version_lag) > sigma for p in flat)
    if sigma > 0:  # at sigma 0 a request cut holding tokens is purged: nothing resumes with a prefix
        assert any(held > 0 for p in flat for asks in p.asks for _, _, held, _ in asks)
        assert any(r == sigma for p in flat for r in p.retention.values())
        assert any(max(p.version_lag) > 0 for p in flat)


def test_hand_worked_phase_on_both_sides() -> None:
    """sigma 0, G 2, Omega 2, Phi 3, max length 8. p0000/0 finishes with 5 tokens: half a group, C = 0. p0001
    finishes with 1 + 2 tokens: C = 3, the crossing. The abort cuts p0000/1 holding 2 tokens (retention 1 > 0:
    purged, p0000/0 with it) and p0002/0 while queued (no token: not aged, carried at retention 0). Next phase: the
    pool holds p0002 only, so one group is admitted; p0002/0 asks for the full 8 again."""
    knobs = C3POConfig(token_budget=3, max_retention=0, pool_prompts=2)
    for side in SchedulerSide(knobs, 2, 8), TrainerSide(knobs, 2, 8):
        assert side.submit() == (2, [("p0000", 0, 0, 8), ("p0000", 1, 0, 8), ("p0001", 0, 0, 8), ("p0001", 1, 0, 8)])
        assert side.finish(("p0000", 0), 5) is False
        assert side.finish(("p0001", 0), 1) is False
        assert side.submit() == (0, [])  # no group left the pool
        assert side.finish(("p0001", 1), 2) is True
        assert side.submit() == (0, [])  # reached: nothing admitted or submitted
        side.cut(("p0000", 1), 2)
        assert side.end() == (["p0001"], 3, {0: 3}, {"p0000"}, {})
        assert side.submit() == (2, [("p0002", 0, 0, 8), ("p0002", 1, 0, 8), ("p0003", 0, 0, 8), ("p0003", 1, 0, 8)])
        assert side.finish(("p0002", 0), 4) is False
        assert side.finish(("p0002", 1), 1) is True  # 5 >= 3
        side.cut(("p0003", 0), 3)  # running, holding 3 tokens: purged (sigma 0)
        side.cut(("p0003", 1), 0)  # queued
        assert side.end() == (["p0002"], 5, {0: 5}, {"p0003"}, {})

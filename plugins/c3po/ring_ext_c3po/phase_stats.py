"""Where a rollout phase's time goes, from the rollout clients' segment reports: pure Python, no verl.

The budget gate (`gate.py`) holds one `PhaseStats` per phase; every C3PO++ client reports each segment the engine
returned (submitted at `start`, returned at `end`). At the phase's end `summary()` gives, as `c3po/<name>`:
- `engine_occupancy`: time-averaged sequences in flight, capped at the engines' batch (`capacity` = max_num_seqs x
  replicas), over capacity, from generation opening to the cut. A segment counts from its submission (`began`) to
  its return, so one still in flight at the cut (`carry: keep` holds it in the engine across the sync) counts in
  this phase up to the cut and in the next from its opening (`next_phase`). Requests the server parks while the
  replicas sync count from the opening on (they are ready to decode then), so a slow resumption shows up as lost
  occupancy only through the re-prefill and the first tokens it delays;
- `cut_s`: the budget crossing to every in-flight request back at its client (the engines stopped): what the cut
  costs the phase that pays it. The resumption's cost lands in the next phase's occupancy and `reprefill_tokens`;
- `reprefill_tokens`: tokens the engines prefill again because a resumed request is resubmitted with what it
  already decoded (`carry: abort`); zero where requests stay in the engine;
- `admission_latency_s`: from a request's completion to the submission of the next fresh request that takes its slot
  (completions and admissions matched in order; the initial fill and admissions ahead of any completion have none);
- `report_delay_s`, `report_delay_max_s`: from a segment's return at its client to its report reaching the gate
  (mean, max): how late the gate hears of completions, which is how late it can cut (clients on another node).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class PhaseStats:
    capacity: int  # sequences the engines decode at once
    opened_at: float | None = None
    cut_at: float | None = None
    reprefill_tokens: int = 0
    _segments: list[tuple[float, float]] = field(default_factory=list)
    _open: dict[str, float] = field(default_factory=dict)  # submitted, not back yet: segment key -> start
    _completions: deque[float] = field(default_factory=deque)
    _latencies: list[float] = field(default_factory=list)
    _delays: list[float] = field(default_factory=list)
    _stopped_at: float | None = None

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"PhaseStats needs capacity >= 1 (max_num_seqs x replicas), got {self.capacity}")

    def open(self, t: float) -> None:
        self.opened_at = t

    def cut(self, t: float) -> None:
        self.cut_at = t

    def began(self, key: str, start: float) -> None:
        """A segment submitted at `start`: in flight until `segment(..., key=key)` reports it back."""
        self._open[key] = start

    def next_phase(self) -> PhaseStats:
        """The next phase's stats: empty but for the segments still in flight now (kept in the engine across the
        sync), which count in it from its opening."""
        return PhaseStats(self.capacity, _open=dict(self._open))

    def segment(self, start: float, end: float, *, fresh: bool, finished: bool, reprefill_tokens: int = 0,
                key: str | None = None, received: float | None = None) -> None:
        """One segment back at its client. `fresh`: the first segment of a new request (it took a freed slot);
        `finished`: the request completed with it (its slot is free); `reprefill_tokens`: decoded tokens it was
        resubmitted with; `key`: the one it `began` with (no longer in flight); `received`: when the report
        arrived (the client's clock and this one are one machine's, or NTP-close across nodes)."""
        if end < start:
            raise ValueError(f"segment ends ({end}) before it starts ({start})")
        if received is not None:
            self._delays.append(max(0.0, received - end))
        if key is not None:
            self._open.pop(key, None)
        self._segments.append((start, end))
        self.reprefill_tokens += int(reprefill_tokens)
        if fresh:
            if self._completions and self._completions[0] <= start:
                self._latencies.append(start - self._completions.popleft())
        if finished:
            self._completions.append(end)
        if self.cut_at is not None and end >= self.cut_at:
            self._stopped_at = max(self._stopped_at or end, end)

    def occupancy(self) -> float | None:
        """Time-averaged min(sequences in flight, capacity) / capacity over [opened_at, cut_at]; a segment not back
        yet is in flight up to the cut."""
        if self.opened_at is None or self.cut_at is None or self.cut_at <= self.opened_at:
            return None
        lo, hi = self.opened_at, self.cut_at
        spans = [*self._segments, *((a, hi) for a in self._open.values())]
        events = sorted([(max(a, lo), 1) for a, b in spans if b > lo and a < hi]
                        + [(min(b, hi), -1) for a, b in spans if b > lo and a < hi])
        busy, active, last = 0.0, 0, lo
        for t, step in events:
            busy += min(active, self.capacity) * (t - last)
            active, last = active + step, t
        return busy / (self.capacity * (hi - lo))

    def summary(self) -> dict[str, float]:
        out = {"c3po/reprefill_tokens": float(self.reprefill_tokens)}
        occupancy = self.occupancy()
        if occupancy is not None:
            out["c3po/engine_occupancy"] = occupancy
        if self.cut_at is not None:
            out["c3po/cut_s"] = max(0.0, (self._stopped_at or self.cut_at) - self.cut_at)
        if self._latencies:
            out["c3po/admission_latency_s"] = sum(self._latencies) / len(self._latencies)
        if self._delays:
            out["c3po/report_delay_s"] = sum(self._delays) / len(self._delays)
            out["c3po/report_delay_max_s"] = max(self._delays)
        return out

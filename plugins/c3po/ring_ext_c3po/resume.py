"""Per-request C3PO++ bookkeeping across abort/resume: pure Python, no verl.

The verl client (`ring_ext_c3po.client.C3POLLMServerClient`) runs one `ResumeTracker` per request: after
every segment the engine returns (finished, or cut short by an abort around a weight sync) it calls
`record()` and obeys the answer. The rules it applies are `rules.resume_budget` and `rules.after_cut` (the
scheduler applies the same ones); what the tracker adds is the per-request record:

- Versions: each segment keeps the policy version that produced it, so per-token versions are run-length
  encoded (`token_versions()` expands them) and line up with the concatenated tokens and log-probs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ring_ext_c3po.rules import after_cut, resume_budget

ABORT_REASONS = frozenset({"abort", "aborted"})


class Next(enum.Enum):
    RESUME = "resume"  # aborted mid-way: resubmit prompt + tokens so far, asking for `remaining`
    FINISHED = "finished"  # EOS/stop or max length: the trajectory is complete
    PURGED = "purged"  # carried across more than sigma updates: drop it (and its group)


@dataclass(frozen=True)
class Segment:
    version: int  # policy version (verl global step of the weights) that decoded these tokens
    tokens: int
    start_s: float  # wall clock, for the timeline plot
    end_s: float

    def to_list(self) -> list[float | int]:
        return [self.version, self.tokens, self.start_s, self.end_s]


@dataclass
class ResumeTracker:
    max_response_length: int
    max_retention: int  # sigma
    segments: list[Segment] = field(default_factory=list)
    retention: int = 0
    outcome: Next | None = None

    def __post_init__(self) -> None:
        if self.max_response_length < 1:
            raise ValueError(f"max_response_length must be >= 1, got {self.max_response_length}")
        if self.max_retention < 0:
            raise ValueError(f"max_retention (sigma) must be >= 0, got {self.max_retention}")

    @classmethod
    def resumed(cls, max_response_length: int, max_retention: int, segments: list[list[float | int]],
                retention: int) -> ResumeTracker:
        """A request carried across a restart: its segments and retention as the spool saved them."""
        done = [Segment(int(v), int(n), float(a), float(b)) for v, n, a, b in segments]
        return cls(max_response_length, max_retention, done, retention, Next.RESUME)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.segments)

    @property
    def remaining(self) -> int:
        return resume_budget(self.max_response_length, self.tokens)

    def record(self, version: int | None, tokens: int, stop_reason: str | None, start_s: float, end_s: float) -> Next:
        if self.outcome is not None and self.outcome is not Next.RESUME:
            raise RuntimeError(f"request already {self.outcome.value}; nothing may be recorded after that")
        if tokens < 0 or tokens > self.remaining:
            raise ValueError(f"segment of {tokens} tokens with {self.remaining} of the response budget left "
                             f"(max_response_length={self.max_response_length}): the engine ignored max_tokens")
        if tokens:
            if version is None:
                raise ValueError("the engine reported no weight version for a segment with tokens")
            self.segments.append(Segment(int(version), tokens, start_s, end_s))
        if self.remaining == 0 or stop_reason not in ABORT_REASONS:
            self.outcome = Next.FINISHED
        else:
            self.retention, purged = after_cut(self.retention, self.tokens, self.max_retention)
            self.outcome = Next.PURGED if purged else Next.RESUME
        return self.outcome

    def token_versions(self) -> list[int]:
        return [s.version for s in self.segments for _ in range(s.tokens)]

    @property
    def versions_spanned(self) -> int:
        return len({s.version for s in self.segments})


def version_lag_counts(segments: list[list[float | int]], policy_version: int) -> dict[int, int]:
    """lag -> number of tokens, lag = policy_version - version of the weights that decoded the token."""
    counts: dict[int, int] = {}
    for version, tokens, *_ in segments:
        lag = policy_version - int(version)
        if lag < 0:
            raise ValueError(f"token from version {version} newer than the policy being trained ({policy_version})")
        counts[lag] = counts.get(lag, 0) + int(tokens)
    return dict(sorted(counts.items()))


def token_lags(segments: list[list[float | int]], policy_version: int) -> list[int]:
    """Per token, in order: policy_version - version of the weights that decoded it (the segments expanded)."""
    lags = [policy_version - int(version) for version, tokens, *_ in segments for _ in range(int(tokens))]
    if any(lag < 0 for lag in lags):
        raise ValueError(f"token newer than the policy being trained ({policy_version}): segments {segments}")
    return lags


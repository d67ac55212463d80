"""C3PO++ pool decisions for the verl trainer mode: typed knobs, top-up, budget check. Pure Python, no verl.

verl keeps the pools in TransferQueue (prompt groups tagged pending/running/finished); the trainer mode asks
these functions what to do with them:
- `top_up`: how many new prompt groups bring the inference pool (pending + running groups) back to Omega.
- `training_batch`: once the finished, unpurged groups hold >= Phi response tokens, ALL of them form the batch
  (the training pool is emptied, Algorithm 1), oldest first; before that, None (keep decoding).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class C3POModeConfig:
    """`trainer.v1.c3po.*` in verl's config (the recipe's values; README lists them)."""

    token_budget: int  # Phi: response tokens of completed groups that end a rollout phase
    max_retention: int = 1  # sigma: updates a group may be carried across holding tokens; purged above it
    pool_prompts: int = 8  # Omega: prompt groups kept in flight (each is rollout.n requests)
    poll_interval_s: float = 0.25  # how often the trainer checks the budget while the engine decodes
    timeline: bool = True  # append each trained/purged request's segments to <default_local_dir>/c3po_timeline.jsonl

    def __post_init__(self) -> None:
        for name in ("token_budget", "pool_prompts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"trainer.v1.c3po.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.max_retention, bool) or not isinstance(self.max_retention, int) or self.max_retention < 0:
            raise ValueError(f"trainer.v1.c3po.max_retention must be an integer >= 0, got {self.max_retention!r}")
        if not self.poll_interval_s > 0:
            raise ValueError(f"trainer.v1.c3po.poll_interval_s must be > 0, got {self.poll_interval_s!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> C3POModeConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown trainer.v1.c3po key(s) {unknown}; known: {sorted(known)}")
        if "token_budget" not in values:
            raise ValueError("trainer.v1.c3po.token_budget (Phi) is required: response tokens per training step")
        return cls(**dict(values))

    def check_reachable(self, group_size: int, max_response_length: int) -> None:
        """Refuse a budget the pool can never fill (the trainer would wait forever)."""
        capacity = self.pool_prompts * group_size * max_response_length
        if self.token_budget > capacity:
            raise ValueError(
                f"trainer.v1.c3po.token_budget={self.token_budget} exceeds what the pool can hold: pool_prompts "
                f"{self.pool_prompts} x rollout.n {group_size} x max_response_length {max_response_length} = {capacity}")


def top_up(in_flight_groups: int, pool_prompts: int) -> int:
    return max(0, pool_prompts - in_flight_groups)


def training_batch(finished: Sequence[tuple[str, int, int]], token_budget: int) -> list[str] | None:
    """`finished`: (uid, dispatch step, response tokens of the whole group) of every finished, unpurged group."""
    if sum(tokens for _, _, tokens in finished) < token_budget:
        return None
    return [uid for uid, _, _ in sorted(finished, key=lambda g: (g[1], g[0]))]

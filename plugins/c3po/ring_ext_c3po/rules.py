"""C3PO++ rules (Ring-1T, arXiv 2510.18855, §2.3.3, Algorithm 1), held once: pure Python, no verl, no torch.

Two callers take every decision from here, so what the simulator measures is what the trainer runs:
- the verl trainer mode: `client.py` per request (resume budget, ageing, purge), `gate.py` per completion
  (the budget crossing that cuts the rollout phase), `buffer.py` per pool poll (top-up, training batch, stall guard);
- the reference scheduler and the simulator (`scheduler.py`, `simulator.py`).

The rules:
- Pool: Omega prompt groups stay in flight; whenever a group finishes or is purged, new prompts enter (`top_up`),
  until the rollout phase's budget is met. A group is a prompt's G samples; it is trained whole or not at all.
- Budget: C counts the response tokens of groups whose LAST sample finished (`GroupBudget`); the completion that
  brings C >= Phi ends the phase (the engine is aborted then, not at a later poll).
- Batch: the finished groups in completion order up to the one that crossed Phi (`training_batch`), as an instant
  cut would leave them; a group that finished within the abort's latency is trained in the next step (all such
  groups, first). So C exceeds Phi only by the crossing group's own tokens, or by what the last cut left over.
- Resume: a request cut by the abort resumes under the new weights asking for max_len - tokens so far
  (`resume_budget`); a request that reached max_len is finished, never carried.
- Ageing and purge (`after_cut`): a request cut while holding tokens is carried across one more policy update
  (retention += 1); cut before its first token it held nothing stale and does not age. Retention > sigma purges
  it, and a purged sample purges its whole group (`GroupBudget.purge`): no partial group is ever trained.
- Staleness (`staleness`): every trained token lags at most sigma versions behind the policy that trains it.
  Waiting for the next step counts against a group's retention: a group that finished after the crossing and whose
  oldest token would then lag more than sigma is purged, not deferred; one whose oldest token already lags more (a
  sibling waited across cuts while queued, which does not age it) is purged whole too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

from ring_ext.knobs import check_knobs, from_mapping, knob

SECTION = "trainer.v1.c3po"


@dataclass(frozen=True)
class C3POConfig:
    """The knobs, `trainer.v1.c3po.*` in verl's config; the scheduler and the simulator take the same type."""

    token_budget: int = knob(ge=1)  # Phi: response tokens of finished groups that end a rollout phase
    max_retention: int = knob(1, ge=0)  # sigma: policy updates a request may be carried across holding tokens
    pool_prompts: int = knob(8, ge=1)  # Omega: prompt groups in flight (each is rollout.n requests)
    poll_interval_s: float = knob(0.05, gt=0)  # how often the trainer reads the pools while the engine decodes
    stall_timeout_s: float = knob(600.0, gt=0)  # no request finished for this long, budget unmet: an error
    carry: Literal["abort", "keep"] = "abort"  # at a cut: abort and resubmit, or pause keeping requests (keep.py)
    adaptive_cut: bool = False  # let the crossing's requests finish when a cut would cost more (adaptive.py)
    # a finished request's slot goes to the next group at the trainer's poll, or at once from the gate (admission.py)
    admission: Literal["poll", "completion"] = "poll"
    timeline: bool = True  # append each trained/purged request's segments to <default_local_dir>/c3po_timeline.jsonl
    timeline_tokens: bool = False  # the timeline also holds each trained request's token ids and rollout log-probs

    def __post_init__(self) -> None:
        check_knobs(self, SECTION)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> C3POConfig:
        if values.get("token_budget") is None and not set(values) - {f.name for f in fields(cls)}:
            raise ValueError(f"{SECTION}.token_budget (Phi) is required: response tokens per training step")
        return from_mapping(cls, values, SECTION)

    @classmethod
    def from_trainer_config(cls, config: Any) -> C3POConfig:
        """The section `trainer.v1.c3po` of verl's whole config (attribute access only: no verl import)."""
        section = config.trainer.v1.get("c3po", None)
        if section is None:
            raise ValueError("trainer.v1.trainer_mode=c3po needs trainer.v1.c3po.token_budget (use +recipe=ring1t "
                             "or add +trainer.v1.c3po.token_budget=<tokens>)")
        return cls.from_mapping(dict(section))

    def check_reachable(self, group_size: int, max_response_length: int) -> None:
        """Refuse a budget that one pool of Omega groups at full length cannot hold: with continuous top-up it is
        reachable in principle, but every phase would outlast several pools and carry nothing useful."""
        capacity = self.pool_prompts * group_size * max_response_length
        if self.token_budget > capacity:
            raise ValueError(
                f"trainer.v1.c3po.token_budget={self.token_budget} exceeds what the pool can hold: pool_prompts "
                f"{self.pool_prompts} x rollout.n {group_size} x max_response_length {max_response_length} "
                f"= {capacity}")

    def describe(self) -> str:
        return (f"token_budget(Phi)={self.token_budget} pool_prompts(Omega)={self.pool_prompts} "
                f"max_retention(sigma)={self.max_retention} carry={self.carry}"
                f"{' adaptive_cut=true' if self.adaptive_cut else ''}"
                f"{' admission=completion' if self.admission == 'completion' else ''}")


def budget_reached(tokens: int, token_budget: int) -> bool:
    return tokens >= token_budget


def top_up(in_flight_groups: int, pool_prompts: int, *, reached: bool, prompts_left: bool = True) -> int:
    """New prompt groups to admit now: back to Omega in flight, none once this phase's budget is met."""
    if reached or not prompts_left:
        return 0
    return max(0, pool_prompts - in_flight_groups)


def resume_budget(max_response_length: int, tokens_so_far: int) -> int:
    """Tokens a (resumed) request may still ask for; 0 means it is finished ("length")."""
    if not 0 <= tokens_so_far <= max_response_length:
        raise ValueError(f"{tokens_so_far} tokens held outside [0, max_response_length={max_response_length}]")
    return max_response_length - tokens_so_far


def after_cut(retention: int, tokens_held: int, max_retention: int) -> tuple[int, bool]:
    """A request the abort cut short: its new retention and whether it is purged."""
    if tokens_held == 0:
        return retention, False  # still queued: nothing stale, no ageing
    retention += 1
    return retention, retention > max_retention


def staleness(oldest_version: int, policy_version: int, max_retention: int) -> str:
    """A finished group whose oldest token was decoded by weights `oldest_version`, at the step that trains policy
    `policy_version`: "purge" (it lags more than sigma already), "now" (it may train in this step, not wait for the
    next), or "any"."""
    lag = policy_version - oldest_version
    if lag > max_retention:
        return "purge"
    return "now" if lag + 1 > max_retention else "any"


def training_batch(finished: Sequence[tuple[str, float, int]], token_budget: int,
                   carried: Collection[str] = ()) -> list[str] | None:
    """`finished`: (uid, completion order, response tokens of the whole group) of every finished, unpurged group;
    `carried`: the uids left over from the previous step (they finished after its crossing). None until the groups
    hold Phi tokens; then every carried group, and the others in completion order up to and including the one that
    crossed Phi: the batch an instant cut would give. A group that finished after the crossing (within the abort's
    latency) is trained in the next step, never later."""
    ordered = sorted(finished, key=lambda g: (g[0] not in carried, g[1], g[0]))
    total, batch = 0, []
    for uid, _, tokens in ordered:
        if uid not in carried and budget_reached(total, token_budget):
            return batch
        batch.append(uid)
        total += tokens
    return batch if budget_reached(total, token_budget) else None


def mini_batches(groups: int, mini_batch_groups: int) -> int:
    """Optimizer steps for a batch of `groups` whole groups: as many as fit `mini_batch_groups` groups each,
    lowered until they divide the batch evenly (every mini-batch holds whole groups, none is padding)."""
    if groups < 1 or mini_batch_groups < 1:
        raise ValueError(f"mini_batches needs groups >= 1 and mini_batch_groups >= 1, "
                         f"got {groups}, {mini_batch_groups}")
    k = max(1, groups // mini_batch_groups)
    while groups % k:
        k -= 1
    return k


class GroupBudget:
    """C of Algorithm 1, counted at completion events: a group's tokens count once its last sample finished.

    Groups are keyed by any hashable that names one group of G (the scheduler's stream position; in verl, the
    prompt's uid: a key shared by two groups in flight would merge their counts and purges). `reset()` starts a
    phase: C = what finished but was not trained; unfinished groups keep their finished samples' tokens (they count
    in the phase that completes them)."""

    def __init__(self, group_size: int, token_budget: int, max_retention: int | None = None) -> None:
        if group_size < 1 or token_budget < 1:
            raise ValueError(f"GroupBudget needs group_size >= 1 and token_budget >= 1, "
                             f"got {group_size}, {token_budget}")
        self.group_size, self.token_budget, self.max_retention = group_size, token_budget, max_retention
        self.tokens = 0  # C
        self._partial: dict[Hashable, list[int]] = {}  # group -> tokens of each finished sample
        self._oldest: dict[Hashable, int] = {}  # group -> oldest policy version among its finished samples' tokens
        self._crossed = False
        self._completed = [0, 0]  # response tokens, groups of every group that completed in the run

    @property
    def group_tokens_mean(self) -> float | None:
        """Response tokens per completed group over the run (None before the first)."""
        return self._completed[0] / self._completed[1] if self._completed[1] else None

    @property
    def reached(self) -> bool:
        return budget_reached(self.tokens, self.token_budget)

    def finish(self, group: Hashable, tokens: int, versions: tuple[int, int] | None = None) -> bool:
        """One sample of `group` finished with `tokens` response tokens, decoded by policy versions
        `versions` = (oldest, newest). True exactly once per phase: at the completion that brings C to Phi (the
        caller cuts the phase there). With `max_retention`, a group whose oldest token already lags more than sigma
        behind the newest (the engine's version now) is not counted: the trainer purges it (`staleness`)."""
        done = self._partial.setdefault(group, [])
        done.append(int(tokens))
        if versions is not None:
            self._oldest[group] = min(self._oldest.get(group, versions[0]), versions[0])
        if len(done) == self.group_size:
            del self._partial[group]
            oldest = self._oldest.pop(group, None)
            self._completed[0] += sum(done)
            self._completed[1] += 1
            if (self.max_retention is None or oldest is None or versions is None
                    or staleness(oldest, versions[1], self.max_retention) != "purge"):
                self.tokens += sum(done)
        if self.reached and not self._crossed:
            self._crossed = True
            return True
        return False

    def purge(self, group: Hashable) -> None:
        """A sample of `group` was purged: the group goes whole, its finished samples no longer count."""
        self._partial.pop(group, None)
        self._oldest.pop(group, None)

    def reset(self, carried_tokens: int = 0) -> None:
        """A new phase: C = the tokens of finished groups not yet trained (they count first)."""
        self.tokens = int(carried_tokens)
        self._crossed = self.reached  # already over: no completion of this phase crosses Phi

    def restore(self, tokens: int) -> None:
        """A resumed run: the finished groups its checkpoint brought back (the earlier process deferred them) count
        first, on top of what this phase counted already, as they did in the process that deferred them."""
        self.tokens += int(tokens)
        self._crossed = self._crossed or self.reached  # restored past Phi: the trainer's poll cuts, no completion


class C3POStall(RuntimeError):
    """The rollout phase can make no progress; the message names budget, pool and counts."""


class StallGuard:
    """Never a silent wait: raise when nothing is in flight with the budget unmet, or when nothing finished for
    `timeout_s` (an engine that stopped decoding, a request that never returns)."""

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s, self.clock = timeout_s, clock
        self._marker: Hashable = None
        self._since = clock()

    def check(self, *, progress: Hashable, in_flight: int, tokens: int, config: C3POConfig, finished: int) -> None:
        now = self.clock()
        if progress != self._marker:
            self._marker, self._since = progress, now
        state = (f"budget {tokens}/{config.token_budget} tokens (Phi), pool {in_flight}/{config.pool_prompts} groups "
                 f"in flight (Omega), {finished} finished groups")
        if in_flight == 0 and not budget_reached(tokens, config.token_budget):
            raise C3POStall(f"C3PO++ stalled: nothing pending or running and the budget unmet; {state}")
        if now - self._since > self.timeout_s:
            raise C3POStall(f"C3PO++ stalled: no request finished for {now - self._since:.0f} s "
                            f"(trainer.v1.c3po.stall_timeout_s={self.timeout_s:g}); {state}")

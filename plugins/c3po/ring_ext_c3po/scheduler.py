"""C3PO++ scheduler core (Ring-1T, arXiv 2510.18855, §2.3.3, Algorithm 1): pure Python, no torch, no verl.

Where it sits: the reference model of Algorithm 1, driven by the simulator (simulator.py). The verl trainer mode
keeps its pools in verl's TransferQueue; both take every decision from rules.py, so they follow one rule set
(tests/test_one_rule_set.py drives both through the same events). A driver asks this core for every decision:
which (partial) rollouts to submit, when the rollout phase of an iteration ends, what the training batch is, and
which rollouts are too stale to keep. One iteration, as a driver runs it:

    while not s.budget_reached:   # and something is pending or running
        submit s.pending_requests() to the engine; s.record(uid, tokens, logprobs, finished=...) per segment
    abort the engine, record() the partial segments it returns (finished=False), then s.abort_in_flight()
    result = s.end_iteration()   # the batch; then update the policy on it and sync the weights to the engine

end_iteration() already increments policy_version: the update and weight sync must be done before the next
pending_requests(), since every token recorded from then on is tagged with the new version. state_dict() is
taken with no request in flight (e.g. right after end_iteration(), as a trainer checkpoint would).

Rules (they live in rules.py, with the knobs `rules.C3POConfig`: Phi = token_budget, sigma = max_retention,
Omega = pool_prompts; this module adds G = group_size and L = max_response_length):
- Pools. The inference pool holds at most Omega prompt GROUPS with unfinished samples; pending_requests() tops it
  up with new prompts, in stream order (`rules.top_up`, none once the budget is met). A prompt has G samples (a
  GRPO group). A group leaves the inference pool for the training pool only when ALL its G samples finished.
- Budget. C counts the response tokens (all versions) of the groups in the training pool, added at the moment a
  group's last sample finishes (`rules.GroupBudget`). budget_reached is C >= Phi; the record() that crosses it
  returns True (the driver aborts the engine there). A rollout phase also ends when the prompts run out and nothing
  is unfinished.
- Batch. end_iteration() trains the groups of the training pool in completion order up to the one that crossed Phi
  (`rules.training_batch`), samples by sample_index; groups completed after the crossing (segments recorded before
  the abort took effect, or returned by it) stay in the training pool and count first in the next iteration.
- Tokens. Every trajectory keeps per token its id, rollout log-prob and the policy version that produced it
  (policy_version at record() time; starts at 0, +1 per end_iteration()); a resumed trajectory mixes versions.
- Resume. A resumed request carries the tokens so far as prefix and asks for L - len(tokens) new tokens
  (`rules.resume_budget`); record() appends only the new segment, so aborted partial tokens are stored once. A
  trajectory that reaches L is finished with reason "length" (unless the engine gave a reason), never carried.
- Retention, per REQUEST (`rules.after_cut`). end_iteration() cuts every unfinished trajectory of the inference
  pool: one that holds tokens is carried across one more policy update (its retention += 1); one still queued with
  no token held nothing stale and does not age. Retention > sigma purges it (retention == sigma is kept). So a
  trained trajectory mixes tokens of at most sigma + 1 policy versions; sigma = 0 drops every trajectory not
  finished within the iteration it started decoding in. The version lag of a group's FINISHED samples is not
  bounded by sigma: they wait, without ageing, for siblings that have not started (their tokens are not mixed
  with newer ones, only older than the policy that trains them).
- Purge: a purged trajectory purges its whole group (finished samples too, `GroupBudget.purge`): its uids become
  unknown (record() raises KeyError) and its prompt is DROPPED for good: not resampled or re-queued;
  end_iteration() reports its prompt id.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from ring_ext_c3po.rules import C3POConfig, GroupBudget, after_cut, resume_budget, top_up, training_batch

STATE_FORMAT = 2  # 2: per-trajectory retention, group dispatch version, config = C3POConfig + G + L
_NO_PEEK, _END = object(), object()


@dataclass
class Trajectory:
    uid: str
    prompt_id: str
    sample_index: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # policy version that produced each token
    finished: bool = False
    finish_reason: str | None = None
    retention: int = 0  # policy updates it was carried across holding tokens (rules.after_cut)

    @property
    def length(self) -> int:
        return len(self.tokens)

    def remaining(self, max_response_length: int) -> int:
        return resume_budget(max_response_length, len(self.tokens))


@dataclass(frozen=True)
class GenerationRequest:
    uid: str
    prompt_id: str
    prefix_tokens: tuple[int, ...]  # response tokens generated so far (empty for a new rollout)
    max_new_tokens: int  # max_response_length - len(prefix_tokens), always >= 1
    sample_index: int = 0


@dataclass(frozen=True)
class IterationResult:
    policy_version: int  # the version trained on this batch (lag reference)
    batch: tuple[tuple[Trajectory, ...], ...]  # finished groups, oldest dispatch first, samples by sample_index
    trained_groups: int
    trained_tokens: int
    carried_groups: int
    purged_groups: int
    purged_prompt_ids: tuple[str, ...]
    version_lag: dict[int, int]  # lag -> number of trained tokens, lag = policy_version - token version


@dataclass
class _Group:
    seq: int  # position of the prompt in the stream (prompt ids may repeat; seq does not)
    prompt_id: str
    dispatched: int  # policy version when the group was admitted (rules.training_batch orders by it)
    trajectories: list[Trajectory]

    @property
    def key(self) -> str:
        return f"{self.seq:012d}"  # rules.training_batch breaks dispatch ties by this string: stream order

    @property
    def tokens(self) -> int:
        return sum(t.length for t in self.trajectories)

    @property
    def retention(self) -> int:
        return max(t.retention for t in self.trajectories)

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "prompt_id": self.prompt_id, "dispatched": self.dispatched,
                "trajectories": [asdict(t) for t in self.trajectories]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _Group:
        return cls(d["seq"], d["prompt_id"], d["dispatched"], [Trajectory(**t) for t in d["trajectories"]])


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"C3POScheduler {name} must be an int >= 1, got {value!r}")
    return value


class C3POScheduler:
    def __init__(self, config: C3POConfig, prompts: Iterable[str], *, group_size: int,
                 max_response_length: int) -> None:
        if not isinstance(config, C3POConfig):
            raise TypeError(f"config must be a rules.C3POConfig, got {type(config).__name__}")
        self.config = config
        self.group_size = _positive_int("group_size", group_size)
        self.max_response_length = _positive_int("max_response_length", max_response_length)
        self.policy_version = 0
        self._prompts = iter(prompts)
        self._peeked: Any = _NO_PEEK
        self._consumed = 0  # prompts turned into groups
        self._budget = GroupBudget(group_size, config.token_budget)  # C, keyed by seq
        self._carried: frozenset[str] = frozenset()  # training-pool groups left over by the last iteration
        self._inference: dict[int, _Group] = {}  # seq -> group with unfinished samples
        self._training: list[_Group] = []  # completed groups, in completion order
        self._uids: dict[str, tuple[_Group, Trajectory]] = {}
        self._submitted: set[str] = set()
        self._totals = {"tokens_trained": 0, "completed_trajectories": 0, "purged": 0}

    def _peek(self) -> str | None:
        if self._peeked is _NO_PEEK:
            self._peeked = next(self._prompts, _END)
            if self._peeked is not _END and not isinstance(self._peeked, str):
                raise TypeError(f"prompt ids must be str, got {self._peeked!r} at position {self._consumed}")
        return None if self._peeked is _END else self._peeked

    def _take(self) -> str:
        prompt_id, self._peeked = self._peek(), _NO_PEEK
        if prompt_id is None:
            raise ValueError(f"prompt stream ended after {self._consumed} prompts")
        self._consumed += 1
        return prompt_id

    def _register(self, group: _Group) -> None:
        for t in group.trajectories:
            self._uids[t.uid] = (group, t)

    def _forget(self, group: _Group) -> None:
        for t in group.trajectories:
            del self._uids[t.uid]

    @property
    def budget_reached(self) -> bool:
        return self._budget.reached

    @property
    def exhausted(self) -> bool:
        return self._peek() is None and not self._inference and not self._training

    def pending_requests(self) -> list[GenerationRequest]:
        if self.budget_reached:
            return []  # the phase is over: nothing is admitted or resubmitted until end_iteration()
        admit = top_up(len(self._inference), self.config.pool_prompts, reached=self.budget_reached,
                       prompts_left=self._peek() is not None)
        for _ in range(admit):
            if self._peek() is None:
                break  # the stream ran out mid top-up
            seq, prompt_id = self._consumed, self._take()
            trajectories = [Trajectory(f"{seq}/{i}", prompt_id, i) for i in range(self.group_size)]
            group = _Group(seq, prompt_id, self.policy_version, trajectories)
            self._inference[seq] = group
            self._register(group)
        requests = []
        for group in self._inference.values():
            for t in group.trajectories:
                if not t.finished and t.uid not in self._submitted:
                    self._submitted.add(t.uid)
                    remaining = t.remaining(self.max_response_length)
                    requests.append(GenerationRequest(t.uid, t.prompt_id, tuple(t.tokens), remaining, t.sample_index))
        return requests

    def record(self, uid: str, tokens: Sequence[int], logprobs: Sequence[float], *, finished: bool,
               finish_reason: str | None = None) -> bool:
        """Append a segment of `uid`'s request. True exactly at the completion that brings C to Phi (the driver
        aborts the engine there), False otherwise."""
        if uid not in self._uids:
            raise KeyError(f"unknown or purged trajectory uid {uid!r}")
        group, traj = self._uids[uid]
        if traj.finished:
            raise ValueError(f"trajectory {uid!r} is already finished ({traj.finish_reason})")
        if uid not in self._submitted:
            raise ValueError(f"trajectory {uid!r} has no request in flight (get it from pending_requests() first)")
        tokens, logprobs = list(tokens), [float(x) for x in logprobs]
        if len(tokens) != len(logprobs):
            raise ValueError(f"trajectory {uid!r}: {len(tokens)} tokens but {len(logprobs)} logprobs")
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in tokens):
            raise ValueError(f"trajectory {uid!r}: token ids must be non-negative ints")
        if not all(math.isfinite(x) for x in logprobs):
            raise ValueError(f"trajectory {uid!r}: non-finite logprob")
        if not finished and finish_reason is not None:
            raise ValueError(f"trajectory {uid!r}: finish_reason {finish_reason!r} given with finished=False")
        max_len = self.max_response_length
        if len(tokens) > traj.remaining(max_len):
            raise ValueError(f"trajectory {uid!r}: {traj.length} + {len(tokens)} tokens exceed "
                             f"max_response_length={max_len}")
        traj.tokens += tokens
        traj.logprobs += logprobs
        traj.versions += [self.policy_version] * len(tokens)
        at_max = traj.remaining(max_len) == 0
        if not (finished or at_max):
            return False
        traj.finished = True
        traj.finish_reason = finish_reason or ("length" if at_max else "stop")
        self._submitted.discard(uid)
        crossed = self._budget.finish(group.seq, traj.length)
        if all(t.finished for t in group.trajectories):
            del self._inference[group.seq]
            self._training.append(group)
        return crossed

    def abort_in_flight(self) -> list[str]:
        uids = [t.uid for g in self._inference.values() for t in g.trajectories if t.uid in self._submitted]
        self._submitted.clear()
        return uids

    def end_iteration(self) -> IterationResult:
        if self._submitted:
            raise RuntimeError(f"{len(self._submitted)} requests still in flight: call abort_in_flight() first")
        version = self.policy_version
        # rules.training_batch over the training pool in completion order: the groups up to the crossing. A phase the
        # prompt stream drained (C < Phi) trains all it has.
        order = training_batch([(g.key, i, g.tokens) for i, g in enumerate(self._training)], self.config.token_budget,
                               self._carried)
        chosen = set(order) if order is not None else {g.key for g in self._training}
        trained = [g for g in self._training if g.key in chosen]
        batch = tuple(tuple(g.trajectories) for g in trained)
        trained_tokens = sum(g.tokens for g in trained)
        lag = Counter(version - v for group in batch for t in group for v in t.versions)
        for g in trained:
            self._forget(g)
        self._training = [g for g in self._training if g.key not in chosen]  # finished after the crossing: next step
        self._budget.reset(sum(g.tokens for g in self._training))
        self._carried = frozenset(g.key for g in self._training)
        self.policy_version += 1
        purged = []
        for seq, g in list(self._inference.items()):
            cut = False  # every unfinished trajectory is cut by this update; any purged one takes the group
            for t in g.trajectories:
                if not t.finished:
                    t.retention, gone = after_cut(t.retention, t.length, self.config.max_retention)
                    cut |= gone
            if cut:
                del self._inference[seq]
                self._forget(g)
                self._budget.purge(seq)
                purged.append(g.prompt_id)
        self._totals["tokens_trained"] += trained_tokens
        self._totals["completed_trajectories"] += sum(len(g) for g in batch)
        self._totals["purged"] += len(purged)
        return IterationResult(version, batch, len(batch), trained_tokens, len(self._inference), len(purged),
                               tuple(purged), dict(sorted(lag.items())))

    def metrics(self) -> dict[str, float]:
        """Cumulative: tokens_trained, completed_trajectories (trained), purged (groups). Current: carried_over (groups
        in the inference pool with a trajectory of retention >= 1), in_flight (unfinished trajectories), budget_used
        (C / Phi)."""
        return {**{k: float(v) for k, v in self._totals.items()},
                "carried_over": float(sum(g.retention > 0 for g in self._inference.values())),
                "in_flight": float(sum(not t.finished for g in self._inference.values() for t in g.trajectories)),
                "budget_used": self._budget.tokens / self.config.token_budget}

    def _config_dict(self) -> dict[str, Any]:
        return {**asdict(self.config), "group_size": self.group_size, "max_response_length": self.max_response_length}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state; take it with no request in flight (after abort_in_flight() or end_iteration())."""
        if self._submitted:
            raise RuntimeError(f"{len(self._submitted)} requests still in flight: call abort_in_flight() first")
        return {"format": STATE_FORMAT, "config": self._config_dict(), "policy_version": self.policy_version,
                "consumed": self._consumed, "budget_tokens": self._budget.tokens, "totals": dict(self._totals),
                "inference_pool": [g.to_dict() for g in self._inference.values()],
                "training_pool": [g.to_dict() for g in self._training], "carried": sorted(self._carried)}

    @classmethod
    def from_state_dict(cls, config: C3POConfig, prompts: Iterable[str], state: dict[str, Any], *, group_size: int,
                        max_response_length: int) -> C3POScheduler:
        """Restore from state_dict(); `prompts` is the same stream from its start (consumed ones are skipped)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported C3PO state format {state.get('format')!r} (expected {STATE_FORMAT})")
        s = cls(config, prompts, group_size=group_size, max_response_length=max_response_length)
        saved, given = state["config"], s._config_dict()
        diff = [f"{k}: saved {saved.get(k)!r}, given {given[k]!r}" for k in given if saved.get(k) != given[k]]
        if diff:
            raise ValueError("C3POConfig/group_size/max_response_length do not match the saved state: "
                             + "; ".join(diff))
        inference = [_Group.from_dict(d) for d in state["inference_pool"]]
        training = [_Group.from_dict(d) for d in state["training_pool"]]
        expected = {g.seq: g.prompt_id for g in inference + training}
        for seq in range(state["consumed"]):
            if s._peek() is None:
                raise ValueError(f"prompt stream has {seq} prompts, the saved state consumed {state['consumed']}")
            prompt_id = s._take()
            if expected.get(seq, prompt_id) != prompt_id:
                raise ValueError(f"prompt stream differs from the saved one at position {seq}: "
                                 f"saved {expected[seq]!r}, given {prompt_id!r}")
        s._inference, s._training = {g.seq: g for g in inference}, training
        # C is rebuilt by replaying the finishes: the completed groups (C, and the crossing already fired if C >= Phi),
        # then the finished samples of the unfinished groups (they count once their group completes).
        for g in training + inference:
            s._register(g)
            for t in g.trajectories:
                if t.finished:
                    s._budget.finish(g.seq, t.length)
        if s._budget.tokens != state["budget_tokens"]:
            raise ValueError(f"saved C = {state['budget_tokens']} but the saved training pool holds {s._budget.tokens}")
        s.policy_version = state["policy_version"]
        s._totals = dict(state["totals"])
        s._carried = frozenset(state["carried"])
        return s

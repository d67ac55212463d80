"""C3PO++ scheduler core (Ring-1T, arXiv 2510.18855, §2.3.3, Algorithm 1): pure Python, no torch, no verl.

Where it sits: the reference model of Algorithm 1, driven by the simulator (simulator.py). The verl trainer mode
(verl_mode.py) keeps its pools in verl's TransferQueue and follows the same rules through resume.py and pool.py.
A driver asks this core for every decision: which (partial) rollouts to submit, when the rollout phase of an
iteration ends, what the training batch is, and which rollouts are too stale to keep. One iteration, as a driver runs it:

    while not s.budget_reached:   # and something is pending or running
        submit s.pending_requests() to the engine; s.record(uid, tokens, logprobs, finished=...) per segment
    abort the engine, record() the partial segments it returns (finished=False), then s.abort_in_flight()
    result = s.end_iteration()   # the batch; then update the policy on it and sync the weights to the engine

end_iteration() already increments policy_version: the update and weight sync must be done before the next
pending_requests(), since every token recorded from then on is tagged with the new version. state_dict() is
taken with no request in flight (e.g. right after end_iteration(), as a trainer checkpoint would).

Rules:
- Pools. The inference pool holds at most Omega = pool_size prompt GROUPS with unfinished samples; it is topped up
  with new prompts, in stream order, by pending_requests(). A prompt has G = group_size samples (a GRPO group).
  A group leaves the inference pool for the training pool only when ALL its G samples finished; groups never split.
- Budget. C counts the response tokens (all versions) of the groups in the training pool; a group's tokens are
  added at the moment its last sample finishes. budget_reached is C >= Phi (token_budget), checked after every
  record(): the group that crosses Phi is included, and pending_requests() returns [] from then on in this
  iteration. Segments recorded after the crossing (in flight at the time, or returned by the abort) still count:
  a group they complete is trained in this iteration too, so C may exceed Phi by more than one group.
  A rollout phase also ends when the prompts run out and nothing is unfinished (C < Phi then).
- Tokens. Every trajectory keeps per token its id, rollout log-prob and the policy version that produced it
  (policy_version at record() time; starts at 0, +1 per end_iteration()); a resumed trajectory mixes versions.
- Resume. A resumed request carries the tokens so far as prefix and asks for max_response_length - len(tokens)
  new tokens; record() appends only the new segment, so aborted partial tokens are stored once. A trajectory that
  reaches max_response_length is finished with reason "length" (unless the engine gave a reason), never carried.
- Retention. A group's retention is the number of policy updates it has been carried across unfinished.
  end_iteration() bumps it by 1 for every group still in the inference pool, then purges groups with
  retention > sigma (max_retention): retention == sigma is kept. So a group is trained with tokens of at most
  sigma + 1 policy versions (lag <= sigma); sigma = 0 drops every group not completed within its first iteration.
- Purge: the whole group goes (finished samples too), its uids become unknown (record() raises KeyError), and its
  prompt is DROPPED for good: it is not resampled or re-queued; end_iteration() reports its prompt id.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

STATE_FORMAT = 1
_NO_PEEK, _END = object(), object()


@dataclass(frozen=True)
class C3POConfig:
    token_budget: int  # Phi: response tokens of completed groups that end a rollout phase
    max_retention: int  # sigma: policy updates a group may be carried across unfinished
    pool_size: int  # Omega: groups in the inference pool
    group_size: int  # G: samples per prompt
    max_response_length: int

    def __post_init__(self) -> None:
        minimum = {"token_budget": 1, "max_retention": 0, "pool_size": 1, "group_size": 1, "max_response_length": 1}
        for name, low in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"C3POConfig.{name} must be an int >= {low}, got {value!r}")


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

    @property
    def length(self) -> int:
        return len(self.tokens)

    def remaining(self, max_response_length: int) -> int:
        return max_response_length - len(self.tokens)


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
    batch: tuple[tuple[Trajectory, ...], ...]  # completed groups in completion order, samples by sample_index
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
    trajectories: list[Trajectory]
    retention: int = 0

    @property
    def tokens(self) -> int:
        return sum(t.length for t in self.trajectories)

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "prompt_id": self.prompt_id, "retention": self.retention,
                "trajectories": [asdict(t) for t in self.trajectories]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _Group:
        return cls(d["seq"], d["prompt_id"], [Trajectory(**t) for t in d["trajectories"]], d["retention"])


class C3POScheduler:
    def __init__(self, config: C3POConfig, prompts: Iterable[str]) -> None:
        if not isinstance(config, C3POConfig):
            raise TypeError(f"config must be a C3POConfig, got {type(config).__name__}")
        self.config = config
        self.policy_version = 0
        self._prompts = iter(prompts)
        self._peeked: Any = _NO_PEEK
        self._consumed = 0  # prompts turned into groups
        self._budget_tokens = 0  # C
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
        return self._budget_tokens >= self.config.token_budget

    @property
    def exhausted(self) -> bool:
        return self._peek() is None and not self._inference and not self._training

    def pending_requests(self) -> list[GenerationRequest]:
        if self.budget_reached:
            return []
        while len(self._inference) < self.config.pool_size and self._peek() is not None:
            seq, prompt_id = self._consumed, self._take()
            trajectories = [Trajectory(f"{seq}/{i}", prompt_id, i) for i in range(self.config.group_size)]
            group = _Group(seq, prompt_id, trajectories)
            self._inference[seq] = group
            self._register(group)
        requests = []
        for group in self._inference.values():
            for t in group.trajectories:
                if not t.finished and t.uid not in self._submitted:
                    self._submitted.add(t.uid)
                    remaining = t.remaining(self.config.max_response_length)
                    requests.append(GenerationRequest(t.uid, t.prompt_id, tuple(t.tokens), remaining, t.sample_index))
        return requests

    def record(self, uid: str, tokens: Sequence[int], logprobs: Sequence[float], *, finished: bool,
               finish_reason: str | None = None) -> None:
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
        max_len = self.config.max_response_length
        if traj.length + len(tokens) > max_len:
            raise ValueError(f"trajectory {uid!r}: {traj.length} + {len(tokens)} tokens exceed "
                             f"max_response_length={max_len}")
        traj.tokens += tokens
        traj.logprobs += logprobs
        traj.versions += [self.policy_version] * len(tokens)
        if finished or traj.length == max_len:
            traj.finished = True
            traj.finish_reason = finish_reason or ("length" if traj.length == max_len else "stop")
            self._submitted.discard(uid)
            if all(t.finished for t in group.trajectories):
                del self._inference[group.seq]
                self._training.append(group)
                self._budget_tokens += group.tokens

    def abort_in_flight(self) -> list[str]:
        uids = [t.uid for g in self._inference.values() for t in g.trajectories if t.uid in self._submitted]
        self._submitted.clear()
        return uids

    def end_iteration(self) -> IterationResult:
        if self._submitted:
            raise RuntimeError(f"{len(self._submitted)} requests still in flight: call abort_in_flight() first")
        version = self.policy_version
        batch = tuple(tuple(g.trajectories) for g in self._training)
        lag = Counter(version - v for group in batch for t in group for v in t.versions)
        trained_tokens = sum(g.tokens for g in self._training)
        for g in self._training:
            self._forget(g)
        self._training, self._budget_tokens = [], 0
        self.policy_version += 1
        purged = []
        for seq, g in list(self._inference.items()):
            if not any(t.length for t in g.trajectories):
                continue  # still queued behind the engine's batch: it holds no stale tokens, so it does not age
            g.retention += 1
            if g.retention > self.config.max_retention:
                del self._inference[seq]
                self._forget(g)
                purged.append(g.prompt_id)
        self._totals["tokens_trained"] += trained_tokens
        self._totals["completed_trajectories"] += sum(len(g) for g in batch)
        self._totals["purged"] += len(purged)
        return IterationResult(version, batch, len(batch), trained_tokens, len(self._inference), len(purged),
                               tuple(purged), dict(sorted(lag.items())))

    def metrics(self) -> dict[str, float]:
        """Cumulative: tokens_trained, completed_trajectories (trained), purged (groups). Current: carried_over (groups
        in the inference pool with retention >= 1), in_flight (unfinished trajectories), budget_used (C / Phi)."""
        return {**{k: float(v) for k, v in self._totals.items()},
                "carried_over": float(sum(g.retention > 0 for g in self._inference.values())),
                "in_flight": float(sum(not t.finished for g in self._inference.values() for t in g.trajectories)),
                "budget_used": self._budget_tokens / self.config.token_budget}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state; take it with no request in flight (after abort_in_flight() or end_iteration())."""
        if self._submitted:
            raise RuntimeError(f"{len(self._submitted)} requests still in flight: call abort_in_flight() first")
        return {"format": STATE_FORMAT, "config": asdict(self.config), "policy_version": self.policy_version,
                "consumed": self._consumed, "budget_tokens": self._budget_tokens, "totals": dict(self._totals),
                "inference_pool": [g.to_dict() for g in self._inference.values()],
                "training_pool": [g.to_dict() for g in self._training]}

    @classmethod
    def from_state_dict(cls, config: C3POConfig, prompts: Iterable[str], state: dict[str, Any]) -> C3POScheduler:
        """Restore from state_dict(); `prompts` is the same stream from its start (consumed ones are skipped)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported C3PO state format {state.get('format')!r} (expected {STATE_FORMAT})")
        saved, given = state["config"], asdict(config)
        diff = [f"{k}: saved {saved.get(k)!r}, given {given.get(k)!r}" for k in given if saved.get(k) != given[k]]
        if diff:
            raise ValueError("C3POConfig does not match the saved state: " + "; ".join(diff))
        s = cls(config, prompts)
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
        for g in inference + training:
            s._register(g)
        s.policy_version, s._budget_tokens = state["policy_version"], state["budget_tokens"]
        s._totals = dict(state["totals"])
        return s

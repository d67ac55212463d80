"""Discrete-event simulator of C3PO++ (Ring-1T §2.3.3, Algorithm 1) against the synchronous baseline; no verl, no torch.

The C3PO++ side is driven by the real scheduler core (`scheduler.C3POScheduler`), which takes its decisions from
`rules.py` like the verl trainer mode, so the simulated policy is the one the trainer runs: budget crossing, pool
top-up, group completion, per-request retention purge, resume prefixes.

Model and assumptions (every number is an input of `SimConfig`; defaults are illustrative, not measured at scale):
- Engine: ONE continuous-batching engine stands for the whole rollout cluster: a FIFO queue and at most `max_batch`
  running sequences (default P*G, i.e. a synchronous batch fits at once). A decode step gives every running
  sequence one token and takes t_step = a + b*n + k*L seconds for n running sequences holding L tokens of context
  in all (prompt + prefix + generated: attention reads each one's KV cache every step). k defaults to 0.
- Prefill: admitting a request stalls the engine for c * (prompt_length + prefix) seconds. A resumed request
  re-prefills its prompt AND the tokens it already generated (no KV cache survives a weight update).
- Cut and admission (C3PO++ only, both measured on the real loop: `c3po/cut_s`, `c3po/admission_latency_s`): each
  phase pays `cut_s` seconds at its cut; a request admitted during a phase (a top-up after a group completed)
  reaches the engine `admission_latency_s` after that completion, the engine decoding what it holds meanwhile.
  Both default to 0 (the instant cut and admission of Algorithm 1). The phase start's submission is not charged:
  the synchronous batch pays the same.
- Training: t_train(T) = d + e*T for T trained response tokens; then a weight sync of s seconds. Rollout, training
  and sync run one after the other (colocated, as verl's hybrid engine): whole step = rollout + train + sync.
- Lengths: sample i of prompt j has response length min(max_len, max(1, round(median * exp(sigma_len * Z)))),
  Z ~ N(0, 1) from random.Random(seed), drawn in stream order, so both policies see the same lengths per prompt.
- Events: time jumps from one completion to the next (the batch is constant in between), never token by token.
- Token quantum q: the engine and the scheduler count tokens in units of q real tokens (lengths rounded up to a
  multiple of q; Phi in units rounded up); times are computed in real tokens. Auto q = max(1, max_len // 512)
  keeps the scheduler's per-token lists small (64K tokens -> q = 128). q = 1 is exact.
- Sync baseline: step k samples prompts kP..kP+P-1 x G samples, waits for the longest, trains on all of them.
- C3PO++: the scheduler over the unbounded prompt stream 0, 1, 2, ...; every pending request is submitted to the
  engine queue at once (oldest group first), so a queued request that holds tokens (a carried one) ages like a
  decoding one, and one still without a token does not (rules.after_cut). A phase ends
  at the completion that brings C >= Phi (all completions of that same decode step are recorded first); the
  engine is then aborted and each running request records its partial tokens (finished=False).
- Equal trained tokens: the baseline runs `steps` steps and trains T tokens; C3PO++ runs iterations until it has
  trained >= T (the overshoot is under one iteration, about Phi). Speed-ups are therefore ratios of seconds
  per trained token; with all lengths equal the totals are exactly equal.
- Version lag of a trained token = policy version trained on - version that produced it (sync: always 0).
- Default costs (paper scale, illustrative): a = 20 ms, b = 10 us/sequence (a full 3840-sequence step: 58 ms, ~66K
  tok/s for the cluster; a lone straggler still pays a), c = 2 us/token, d = 30 s, e = 20 us/token, s = 10 s.
  Speed-ups depend mostly on a / (b * max_batch) (how cheap a nearly empty decode step is) and on e (Amdahl).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass
from typing import Any

from ring_ext_c3po.rules import C3POConfig
from ring_ext_c3po.scheduler import C3POScheduler, IterationResult


@dataclass(frozen=True)
class SimConfig:
    prompts_per_step: int = 480  # P
    group_size: int = 8  # G
    steps: int = 8  # synchronous steps; fixes the trained-token target
    max_response_length: int = 65536
    length_median: float = 8192.0
    length_sigma: float = 1.0  # log-normal tail; 0 = all lengths equal to the median
    prompt_length: int = 1024
    max_batch: int | None = None  # None: P*G
    token_budget: int | None = None  # Phi in tokens; None: mean tokens of a synchronous batch
    max_retention: int = 2  # sigma
    pool_prompts: int | None = None  # Omega in groups; None: 2P, so the engine queue never runs dry
    step_fixed_s: float = 0.02  # a
    step_per_seq_s: float = 1e-5  # b
    prefill_per_token_s: float = 2e-6  # c
    step_per_context_token_s: float = 0.0  # k: KV-cache read per token of context, per decode step
    cut_s: float = 0.0  # C3PO++: seconds each phase's cut costs
    admission_latency_s: float = 0.0  # C3PO++: a completion to its replacement reaching the engine
    train_fixed_s: float = 30.0  # d
    train_per_token_s: float = 2e-5  # e
    sync_s: float = 10.0  # s
    token_quantum: int = 0  # q; 0 = auto
    seed: int = 0

    @property
    def quantum(self) -> int:
        return self.token_quantum or max(1, self.max_response_length // 512)

    @property
    def batch(self) -> int:
        return self.max_batch or self.prompts_per_step * self.group_size

    @property
    def pool(self) -> int:
        return self.pool_prompts or 2 * self.prompts_per_step


class Lengths:
    """Response lengths in units of q, per prompt (stream position), drawn lazily and deterministically."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg, self.q = cfg, cfg.quantum
        self.max_units = math.ceil(cfg.max_response_length / self.q)
        self._rng: random.Random | None = random.Random(cfg.seed)
        self._table: list[list[int]] = []

    @classmethod
    def fixed(cls, cfg: SimConfig, table: list[list[int]]) -> Lengths:
        """Given lengths in units (tests, replays); a prompt past the table raises IndexError."""
        lengths = cls(cfg)
        lengths._table, lengths._rng = [list(row) for row in table], None
        return lengths

    def __call__(self, seq: int) -> list[int]:
        c = self.cfg
        while len(self._table) <= seq and self._rng is not None:
            z = [self._rng.gauss(0.0, 1.0) for _ in range(c.group_size)]
            real = [min(c.max_response_length, max(1, round(c.length_median * math.exp(c.length_sigma * x))))
                    for x in z]
            self._table.append([math.ceil(x / self.q) for x in real])
        return self._table[seq]


class Engine:
    """Continuous batching in units of q tokens; advance() jumps to the next completion (or to the moment a queued
    request becomes ready for a free slot)."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg, self.q = cfg, cfg.quantum
        self.clock = self.idle_s = self.prefill_s = 0.0
        self.step, self.decoded = 0, 0  # decode steps (units) so far; real tokens decoded
        self.queue: deque[tuple[Hashable, int, int, float]] = deque()  # (uid, prefix units, units to go, ready at)
        self.start: dict[Hashable, int] = {}  # running uid -> step it started decoding
        self.heap: list[tuple[int, int, Hashable]] = []  # (finish step, tie-break, uid)
        self._tie = itertools.count()
        self.base: dict[Hashable, int] = {}  # running uid -> its context (real tokens) minus step * q
        self.base_sum = 0

    def submit(self, uid: Hashable, prefix: int, remaining: int, ready_at: float = 0.0) -> None:
        assert remaining >= 1, (uid, remaining)
        self.queue.append((uid, prefix, remaining, ready_at))

    def fill(self) -> None:
        c = self.cfg
        while self.queue and len(self.start) < c.batch and self.queue[0][3] <= self.clock:
            uid, prefix, remaining, _ = self.queue.popleft()
            dt = c.prefill_per_token_s * (c.prompt_length + prefix * self.q)
            self.clock, self.prefill_s = self.clock + dt, self.prefill_s + dt
            self.start[uid] = self.step
            self.base[uid] = c.prompt_length + (prefix - self.step) * self.q
            self.base_sum += self.base[uid]
            heapq.heappush(self.heap, (self.step + remaining, next(self._tie), uid))

    def advance(self) -> list[Hashable]:
        """Decode until the next completion; returns every uid that finishes at that step. With a free slot and a
        queued request not ready yet, decode (or idle, when nothing runs) only until it is ready: returns []."""
        c, n = self.cfg, len(self.start)
        ready = self.queue[0][3] if self.queue and n < c.batch and self.queue[0][3] > self.clock else None
        if n == 0:
            assert ready is not None, "advance() on an empty engine with nothing to wait for"
            self.idle_s, self.clock = self.idle_s + ready - self.clock, ready
            return []
        finish = self.heap[0][0]
        if ready is not None:  # whole decode steps (units) at the current step time until it is ready
            t_unit = self.q * (c.step_fixed_s + c.step_per_seq_s * n)
            units = max(1, math.ceil((ready - self.clock) / t_unit)) if t_unit > 0 else 1
            finish = min(finish, self.step + units)
        steps = (finish - self.step) * self.q  # real decode steps; every context grows by one per step
        context_steps = steps * (self.base_sum + n * self.step * self.q) + n * steps * (steps - 1) // 2
        dt = steps * (c.step_fixed_s + c.step_per_seq_s * n) + c.step_per_context_token_s * context_steps
        self.clock += dt
        self.idle_s += dt * (c.batch - n) / c.batch  # unused batch slots, in engine-seconds
        self.decoded += steps * n
        self.step, done = finish, []
        while self.heap and self.heap[0][0] == finish:
            uid = heapq.heappop(self.heap)[2]
            del self.start[uid]
            self.base_sum -= self.base.pop(uid)
            done.append(uid)
        return done

    def abort(self) -> dict[Hashable, int]:
        """Stop everything; running uid -> units generated in this phase (queued ones generated nothing)."""
        partial = {uid: self.step - s for uid, s in self.start.items()}
        self.queue.clear(), self.start.clear(), self.heap.clear(), self.base.clear()
        self.base_sum = 0
        return partial


@dataclass
class PolicyStats:
    policy: str
    steps: int = 0
    trained_tokens: int = 0
    rollout_s: float = 0.0
    train_s: float = 0.0
    sync_s: float = 0.0
    idle_s: float = 0.0
    prefill_s: float = 0.0
    decoded_tokens: int = 0
    trained_groups: int = 0
    purged_groups: int = 0
    lag_tokens: dict[int, int] | None = None  # version lag -> trained tokens

    def summary(self) -> dict[str, Any]:
        lag = self.lag_tokens or {0: self.trained_tokens}
        total = self.rollout_s + self.train_s + self.sync_s
        out = {k: v for k, v in asdict(self).items() if k != "lag_tokens"}
        return {**out, "total_s": total, "rollout_s_per_step": self.rollout_s / max(1, self.steps),
                "step_s": total / max(1, self.steps),
                "rollout_s_per_mtok": self.rollout_s / self.trained_tokens * 1e6,
                "total_s_per_mtok": total / self.trained_tokens * 1e6,
                "mean_version_lag": sum(k * v for k, v in lag.items()) / max(1, sum(lag.values())),
                "max_version_lag": max(lag, default=0),
                "purge_rate": self.purged_groups / max(1, self.purged_groups + self.trained_groups),
                "idle_frac": self.idle_s / max(1e-12, self.rollout_s - self.prefill_s)}


def _charge(stats: PolicyStats, eng: Engine, tokens: int) -> None:
    c = eng.cfg
    stats.steps += 1
    stats.trained_tokens += tokens
    stats.rollout_s += eng.clock
    stats.train_s += c.train_fixed_s + c.train_per_token_s * tokens
    stats.sync_s += c.sync_s
    stats.idle_s += eng.idle_s
    stats.prefill_s += eng.prefill_s
    stats.decoded_tokens += eng.decoded


def run_sync(cfg: SimConfig, lengths: Lengths | None = None) -> PolicyStats:
    lengths, stats = lengths or Lengths(cfg), PolicyStats("sync")
    for k in range(cfg.steps):
        eng, tokens = Engine(cfg), 0
        for seq in range(k * cfg.prompts_per_step, (k + 1) * cfg.prompts_per_step):
            for i, units in enumerate(lengths(seq)):
                eng.submit((seq, i), 0, units)
                tokens += units * eng.q
        eng.fill()
        while eng.start:
            eng.advance()
            eng.fill()
        stats.trained_groups += cfg.prompts_per_step
        _charge(stats, eng, tokens)
    return stats


def _submit_pending(sched: C3POScheduler, eng: Engine, lengths: Lengths, prefix: dict[str, int],
                    ready_at: float = 0.0) -> None:
    for r in sched.pending_requests():  # oldest group first: carried (resumed) requests lead the queue
        prefix[r.uid] = len(r.prefix_tokens)
        eng.submit(r.uid, prefix[r.uid], lengths(int(r.prompt_id))[r.sample_index] - prefix[r.uid], ready_at)


def run_c3po(cfg: SimConfig, target_tokens: int, budget_tokens: int, lengths: Lengths | None = None,
             on_iteration: Callable[[IterationResult], None] | None = None) -> tuple[PolicyStats, C3POScheduler]:
    """C3PO++ iterations until >= target_tokens are trained; returns the stats and the scheduler (state at the end)."""
    lengths, stats, q, lag = lengths or Lengths(cfg), PolicyStats("c3po++"), cfg.quantum, Counter[int]()
    knobs = C3POConfig(token_budget=math.ceil(budget_tokens / q), max_retention=cfg.max_retention,
                       pool_prompts=cfg.pool)
    sched = C3POScheduler(knobs, map(str, itertools.count()), group_size=cfg.group_size,
                          max_response_length=lengths.max_units)
    done_count: Counter[str] = Counter()  # finished samples per prompt: a group leaving the pool frees a pool slot
    while stats.trained_tokens < target_tokens:
        eng, prefix = Engine(cfg), dict[str, int]()  # uid -> prefix units of its request in this phase
        _submit_pending(sched, eng, lengths, prefix)
        eng.fill()
        while (eng.start or eng.queue) and not sched.budget_reached:
            group_left = False
            for uid in eng.advance():
                prompt_id, _, i = uid.partition("/")  # scheduler uids are "seq/sample"
                n = lengths(int(prompt_id))[int(i)] - prefix.pop(uid)
                sched.record(uid, [0] * n, [0.0] * n, finished=True)  # "length" if it hit max_len
                done_count[prompt_id] += 1
                group_left |= done_count[prompt_id] == cfg.group_size
            if group_left and not sched.budget_reached:  # top the pool up; only a completed group frees room
                _submit_pending(sched, eng, lengths, prefix, eng.clock + cfg.admission_latency_s)
            if not sched.budget_reached:
                eng.fill()
        for uid, n in eng.abort().items():
            if n:
                sched.record(uid, [0] * n, [0.0] * n, finished=False)
        sched.abort_in_flight()
        eng.clock += cfg.cut_s  # the crossing to the engines stopped, and their resumption
        res = sched.end_iteration()
        for group in res.batch:
            del done_count[group[0].prompt_id]
        for prompt_id in res.purged_prompt_ids:
            done_count.pop(prompt_id, None)
        stats.trained_groups += res.trained_groups
        stats.purged_groups += res.purged_groups
        lag.update({k: n * q for k, n in res.version_lag.items()})
        _charge(stats, eng, res.trained_tokens * q)
        if on_iteration is not None:
            on_iteration(res)
    stats.lag_tokens = dict(sorted(lag.items()))
    return stats, sched


def compare(cfg: SimConfig) -> dict[str, Any]:
    """Both policies on the same lengths; speed-ups are sync seconds per trained token / C3PO++ seconds per token."""
    lengths = Lengths(cfg)
    sync = run_sync(cfg, lengths)
    budget = cfg.token_budget or math.ceil(sync.trained_tokens / cfg.steps)
    c3po, _ = run_c3po(cfg, sync.trained_tokens, budget, lengths)
    s, c = sync.summary(), c3po.summary()
    return {"config": {**asdict(cfg), "quantum": cfg.quantum, "max_batch": cfg.batch, "token_budget": budget,
                       "pool_prompts": cfg.pool},
            "sync": s, "c3po": c,
            "rollout_speedup": s["rollout_s_per_mtok"] / c["rollout_s_per_mtok"],
            "step_speedup": s["total_s_per_mtok"] / c["total_s_per_mtok"],
            "rollout_step_ratio": s["rollout_s_per_step"] / c["rollout_s_per_step"]}

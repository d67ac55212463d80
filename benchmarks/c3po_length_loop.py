"""Benchmark-only agent loop: each request decodes exactly L tokens, L drawn from a seeded log-normal length mix.

verl's single-turn loop with `ignore_eos` and a per-request `max_tokens` (resumed requests keep it: both verl's
partial-rollout client and C3PO++'s ask only for what is left), so every trainer mode decodes the same lengths
whatever the (random) tiny model would emit. L is a function of (seed, dataset row, sample index in the group) only:
a row trained by two modes decodes the same L in both, and `heavy`/`light` share the normal draw (coupled tails).
Knobs come from the environment, set by bench_c3po_vllm.py: C3PO_BENCH_MEDIAN, C3PO_BENCH_SIGMA, C3PO_BENCH_MAX,
C3PO_BENCH_SEED. The math below imports nothing heavy; verl is imported only when the loop class is first asked for.
With C3PO_BENCH_SEGMENTS (a folder) every engine call of the process, whatever the trainer mode (verl's
`LLMServerClient.generate`: one per segment, also under verl's and C3PO++'s resuming clients), appends its
[start, end, tokens] there (`segments-<pid>.jsonl`), from which the benchmark measures every mode's engine
occupancy alike (and calibrate_loop_decode.py the engine's cost per decode step inside the loop).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

DISTS: dict[str, float] = {"heavy": 1.0, "light": 0.25}  # log-normal sigma; both keep the median
SEGMENTS_ENV = "C3PO_BENCH_SEGMENTS"


def draw_seed(seed: int, row: int, session: int) -> int:
    # blake2b, not hash(): Python salts str hashes per process, and the Ray workers must agree across runs
    digest = hashlib.blake2b(f"{seed}/{row}/{session}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def draw_length(seed: int, row: int, session: int, median: float, sigma: float, max_len: int) -> int:
    """L = clip(round(median * exp(sigma * z)), 1, max_len), z ~ N(0, 1) seeded by (seed, row, session)."""
    z = random.Random(draw_seed(seed, row, session)).gauss(0.0, 1.0)
    return max(1, min(max_len, round(median * math.exp(sigma * z))))


def expected_length(median: float, sigma: float, max_len: int) -> float:
    """E[L] of `draw_length`, rounding and both clips included (exact: a sum over the integer lengths)."""
    def cdf(x: float) -> float:  # P(median * exp(sigma z) < x)
        return 0.0 if x <= 0 else 0.5 * (1.0 + math.erf(math.log(x / median) / (sigma * math.sqrt(2.0))))

    if max_len == 1:
        return 1.0
    mean = 1.0 * cdf(1.5) + max_len * (1.0 - cdf(max_len - 0.5))
    return mean + sum(k * (cdf(k + 0.5) - cdf(k - 0.5)) for k in range(2, max_len))


def row_of(kwargs: dict[str, Any]) -> int:
    """The dataset row: verl's `index` (RLHFDataset copies extra_info.index there), else extra_info.index."""
    index = kwargs.get("index")
    if index is None:
        index = (kwargs.get("extra_info") or {}).get("index")
    if index is None:
        raise KeyError("c3po_length_loop needs the dataset row's `index` (or extra_info.index) to seed its length")
    return int(index)  # a 0-d tensor or numpy scalar from the batch


def append_interval(kind: str, start: float, end: float, *extra: int) -> None:
    """[start, end, *extra] to <C3PO_BENCH_SEGMENTS>/<kind>-<pid>.jsonl (one writer per file: no lock); nothing
    when unset."""
    folder = os.environ.get(SEGMENTS_ENV)
    if folder:
        with open(Path(folder) / f"{kind}-{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps([start, end, *extra]) + "\n")


def read_intervals(folder: Path, kind: str) -> list[list[float]]:
    """Every record `append_interval` wrote under `folder` for `kind`, all processes' files, sorted by start."""
    return sorted(json.loads(line) for f in Path(folder).glob(f"{kind}-*.jsonl") for line in f.read_text().splitlines())


def _record_engine_calls() -> None:
    """Wrap verl's per-segment engine call once per process: its [start, end] go to `append_interval`."""
    from verl.workers.rollout.llm_server import LLMServerClient

    original = LLMServerClient.generate
    if not os.environ.get(SEGMENTS_ENV) or getattr(original, "bench_recorded", False):
        return

    async def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        start, out = time.time(), None
        try:
            out = await original(self, *args, **kwargs)
            return out
        finally:  # and the tokens it decoded (calibrate_loop_decode.py), 0 where it raised
            append_interval("segments", start, time.time(), len(getattr(out, "token_ids", None) or ()))

    generate.bench_recorded = True  # type: ignore[attr-defined]
    LLMServerClient.generate = generate  # resolved at call time by verl's and C3PO++'s resuming clients alike


def _build_loop_class() -> type:
    from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

    _record_engine_calls()

    class LogNormalLengthAgentLoop(SingleTurnAgentLoop):
        async def run(self, sampling_params: dict[str, Any], **kwargs: Any):
            # session_id: the sample's place in its group, [0, rollout.n) (verl's _run_prompt passes it)
            length = draw_length(int(os.environ.get("C3PO_BENCH_SEED", "0")), row_of(kwargs),
                                 int(kwargs["session_id"]), float(os.environ.get("C3PO_BENCH_MEDIAN", "24")),
                                 float(os.environ.get("C3PO_BENCH_SIGMA", "1.0")),
                                 min(int(os.environ.get("C3PO_BENCH_MAX", self.response_length)), self.response_length))
            return await super().run({**sampling_params, "max_tokens": length, "ignore_eos": True}, **kwargs)

    # pickled by reference as c3po_length_loop.LogNormalLengthAgentLoop (resolved through __getattr__ below)
    LogNormalLengthAgentLoop.__module__, LogNormalLengthAgentLoop.__qualname__ = __name__, "LogNormalLengthAgentLoop"
    return LogNormalLengthAgentLoop


def __getattr__(name: str) -> Any:
    """PEP 562: Hydra's `_target_: c3po_length_loop.LogNormalLengthAgentLoop` builds the class on first access."""
    if name != "LogNormalLengthAgentLoop":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = globals()[name] = _build_loop_class()
    return cls

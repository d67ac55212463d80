"""Benchmark-only agent loop: each request decodes exactly L tokens, L ~ log-normal (a heavy-tailed length mix).

verl's single-turn loop with `ignore_eos` and a per-request `max_tokens`, so the synchronous baseline and C3PO++
see the same length distribution whatever the (random) tiny model would emit. Knobs come from the environment
(set by bench_c3po_vllm.py): C3PO_BENCH_MEDIAN, C3PO_BENCH_SIGMA, C3PO_BENCH_MAX.
"""

from __future__ import annotations

import math
import os
import random
from typing import Any

from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop


def draw_length(rng: random.Random, median: float, sigma: float, max_len: int) -> int:
    return max(1, min(max_len, round(median * math.exp(rng.gauss(0.0, sigma)))))


class LogNormalLengthAgentLoop(SingleTurnAgentLoop):
    async def run(self, sampling_params: dict[str, Any], **kwargs: Any):
        median = float(os.environ.get("C3PO_BENCH_MEDIAN", "48"))
        sigma = float(os.environ.get("C3PO_BENCH_SIGMA", "1.0"))
        max_len = int(os.environ.get("C3PO_BENCH_MAX", str(self.response_length)))
        length = draw_length(random.Random(), median, sigma, min(max_len, self.response_length))
        params = {**sampling_params, "max_tokens": length, "ignore_eos": True}
        return await super().run(params, **kwargs)

"""Benchmark-only samplers: verl's own replay buffers polling TransferQueue as often as C3PO++ does.

verl 0.9.1 builds its buffers with `poll_interval=2.0` (no config key), so a synchronous or colocate_async rollout
phase ends at the next 2 s poll after its last group finishes, while C3PO++ polls every `poll_interval_s` (0.05 s)
and cuts at the crossing completion. bench_c3po_vllm.py plugs these in through verl's own hook
(`trainer.v1.sampler.custom_sampler.{path,name}`) so every mode notices a finished batch equally fast.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync

from ring_ext_c3po.rules import C3POConfig

POLL_INTERVAL_S = next(f.default for f in fields(C3POConfig) if f.name == "poll_interval_s")


class FastPollReplayBuffer(ReplayBuffer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "poll_interval": POLL_INTERVAL_S})


class FastPollReplayBufferAsync(ReplayBufferAsync):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "poll_interval": POLL_INTERVAL_S})

"""Benchmark-only samplers: verl's own replay buffers polling TransferQueue as often as C3PO++ does.

verl 0.9.1 builds its buffers with `poll_interval=2.0` (no config key), so a synchronous or colocate_async rollout
phase ends at the next 2 s poll after its last group finishes, while C3PO++ polls every `poll_interval_s` (0.05 s)
and cuts at the crossing completion. bench_c3po_vllm.py plugs these in through verl's own hook
(`trainer.v1.sampler.custom_sampler.{path,name}`) so every mode notices a finished batch equally fast.
Each training sample's [start, end] (the rollout phase as the trainer waits for it) goes to C3PO_BENCH_SEGMENTS
(`c3po_length_loop.append_interval`), the window over which the benchmark measures the baselines' engine occupancy.
"""

from __future__ import annotations

import time
from dataclasses import fields
from typing import Any

from c3po_length_loop import append_interval
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync

from ring_ext_c3po.rules import C3POConfig

POLL_INTERVAL_S = next(f.default for f in fields(C3POConfig) if f.name == "poll_interval_s")


class _PhaseWindows:
    def sample(self, global_steps: int, partition_id: str, batch_size: int) -> Any:
        start = time.time()
        out = super().sample(global_steps, partition_id, batch_size)  # type: ignore[misc]
        if partition_id == "train":
            append_interval("phases", start, time.time())
        return out


class FastPollReplayBuffer(_PhaseWindows, ReplayBuffer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "poll_interval": POLL_INTERVAL_S})


class FastPollReplayBufferAsync(_PhaseWindows, ReplayBufferAsync):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "poll_interval": POLL_INTERVAL_S})

"""Ray actors hosting the real ``astate`` engine from verl's registry, one per trainer rank / rollout worker."""

from __future__ import annotations

import os

import ray
import torch


def model_weights(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    w = {f"model.layers.{i}.mlp.weight": torch.randn(64, 48, generator=g) for i in range(3)}
    w["model.embed_tokens.weight"] = torch.randn(101, 32, generator=g).to(torch.bfloat16)
    return w


@ray.remote(num_cpus=0)
class EnginePeer:
    """Like verl's workers: the engine comes from CheckpointEngineRegistry, `is_master` only on trainer ranks."""

    def __init__(self, trainer_rank: int | None, **engine_kwargs) -> None:
        torch.set_num_threads(1)
        from verl.checkpoint_engine import CheckpointEngineRegistry

        kwargs = {"is_master": trainer_rank == 0} if trainer_rank is not None else {}
        self.engine = CheckpointEngineRegistry.new("astate", bucket_size=4 << 10, **kwargs, **engine_kwargs)
        self.weights = {n: torch.zeros_like(t) for n, t in model_weights(0).items()}  # the "vLLM" copy

    def call(self, method: str, *args, **kwargs):
        return getattr(self.engine, method)(*args, **kwargs)

    async def send(self, step: int, die_after: int | None = None):
        def gen():
            for i, item in enumerate(model_weights(step).items()):
                if die_after is not None and i == die_after:
                    os._exit(3)  # a trainer rank dies mid-sync
                yield item

        return await self.engine.send_weights(gen(), global_steps=step)

    async def receive(self, step: int) -> int:
        n = 0
        async for name, t in self.engine.receive_weights(global_steps=step):
            self.weights[name].copy_(t)  # in place, as vLLM's load_weights does
            n += 1
        return n

    def get_weights(self) -> dict[str, torch.Tensor]:
        return self.weights

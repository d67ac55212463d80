"""OmegaConf resolvers the recipes use, registered in every process before verl resolves its config.

- `${ring_ext.accel:CPU_VALUE,GPU_VALUE}` picks a value by training device, so one recipe serves
  both a CPU machine (with ring-ext-cpu) and a GPU cluster without user overrides.
- `${ring_ext.tiny:WHAT}` builds (once, cached) the embedded tiny default and returns the path of
  WHAT in {model, moe_model, reward_model, train, val, sft, open_prompts, reward} (reward: the file of its
  rule-based `compute_score`, for verl's `custom_reward_function.path`).
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

TINY_ITEMS = ("model", "moe_model", "reward_model", "train", "val", "sft", "open_prompts", "reward")


def _accel(cpu_value: Any, gpu_value: Any) -> Any:
    from ring_ext.device import on_cpu

    return cpu_value if on_cpu() else gpu_value


def _tiny(what: str) -> str:
    if what not in TINY_ITEMS:
        raise ValueError(f"${{ring_ext.tiny:{what}}}: unknown item, expected one of {TINY_ITEMS}")
    if what == "reward":
        from importlib.util import find_spec

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


def register_resolvers() -> None:
    for name, fn in (("ring_ext.accel", _accel), ("ring_ext.tiny", _tiny)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)

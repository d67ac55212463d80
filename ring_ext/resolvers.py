"""OmegaConf resolvers the recipes use, registered in every process before verl resolves its config.

- `${ring_ext.accel:CPU_VALUE,GPU_VALUE}` picks a value by training device, so one recipe serves
  both a CPU machine (with ring-ext-cpu) and a GPU cluster without user overrides.
- `${ring_ext.tiny:WHAT}` builds (once, cached) the embedded tiny default and returns the path of
  WHAT in {model, moe_model, reward_model, train, val, sft, open_prompts, reward} (reward: the file of its
  rule-based `compute_score`, for verl's `custom_reward_function.path`).
- `${ring_ext.weight_sync:${trainer.v1.trainer_mode}}` picks the checkpoint engine: verl's in-process `naive` for
  the colocated modes, `astate` (ring-ext-astate) where rollout replicas have devices of their own, which verl 0.9.1
  refuses to serve with `naive`.
- `${ring_ext.attention:}` and `${ring_ext.packed:}`: the attention implementation and `use_remove_padding`. With
  packed sequences (remove padding) transformers' sdpa path builds a dense [T, T] mask per micro-batch (at the paper
  profile's 66K tokens, ~4.4 GB); flash-attention's varlen kernel needs none. GPU with flash-attn installed:
  `flash_attention_2`, packed; GPU without it: `sdpa`, padded (no dense packed mask; the start-up log says so);
  CPU: `sdpa`, padded.
- `${ring_ext.inplace_sync:}` is vLLM's `weight_transfer_config` for the in-place sync: `{backend: astate}` where
  ring-ext-astate says it can run (`ring_ext_astate.support.unavailable`: vLLM >= 0.29, CPU), else null and verl's
  bucket copy runs (verl 0.9.1's own pin, vLLM 0.24, lacks the interface; the GPU writer is not built).
- `${ring_ext.local_ray:VALUE}` (in `ray_kwargs.ray_init`): VALUE when `ray.init` starts Ray itself, null
  when it attaches to a running cluster (RAY_ADDRESS, a sibling `address`, or a `ray start` cluster on this
  machine), where `ray.init` refuses `num_cpus`.
"""

from __future__ import annotations

from importlib.util import find_spec
from typing import Any

from omegaconf import OmegaConf

from ring_ext.known_plugins import provider, require

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


def flash_attention() -> bool:
    from ring_ext.device import on_cpu

    return not on_cpu() and find_spec("flash_attn") is not None


def _attention() -> str:
    return "flash_attention_2" if flash_attention() else "sdpa"


def _packed() -> bool:
    return flash_attention()


def _inplace_sync() -> Any:
    from ring_ext.device import on_cpu, training_device
    from ring_ext.patching import resolve

    astate = provider("checkpoint_engine", "astate")
    if on_cpu():
        require("checkpoint_engine", "astate", "the recipe syncs weights in place through astate",
                "set actor_rollout_ref.rollout.engine_kwargs.vllm.weight_transfer_config=null (verl's copy)")
    elif astate is None or not astate.installed():
        return None
    # the plugin's one rule (the installed vLLM, the device); its start-up check logs the reason when it says no
    if resolve("ring_ext_astate.support:unavailable")(training_device()) is not None:
        return None
    return OmegaConf.create({"backend": "astate"})  # a node: OmegaConf.resolve cannot store a plain dict


def ray_starts_locally(address: str | None, temp_dir: str | None = None) -> bool:
    """ray.init's own choice (`canonicalize_bootstrap_address`): None or "auto" look at RAY_ADDRESS, then at
    the address file a `ray start` on this machine leaves; None found, or "local", starts a new instance."""
    if address is None or address == "auto":
        from ray._private.services import get_ray_address_from_environment

        try:
            address = get_ray_address_from_environment(address, temp_dir)
        except ConnectionError:  # "auto" with no cluster: ray.init raises this itself, naming why
            return False
    return address is None or address == "local"


def _local_ray(value: Any, *, _parent_: Any) -> Any:
    # _parent_ is ray_kwargs.ray_init: ray.init reads `address` and `_temp_dir` from the same section
    ray_init = _parent_ if _parent_ is not None else {}
    return value if ray_starts_locally(ray_init.get("address"), ray_init.get("_temp_dir")) else None


def register_resolvers() -> None:
    for name, fn in (("ring_ext.accel", _accel), ("ring_ext.tiny", _tiny), ("ring_ext.weight_sync", _weight_sync),
                     ("ring_ext.inplace_sync", _inplace_sync), ("ring_ext.attention", _attention),
                     ("ring_ext.packed", _packed),
                     ("ring_ext.local_ray", _local_ray)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)

"""The device is decided once, in the driver, and every process of the run resolves the recipes with it."""

from __future__ import annotations

import pytest
from subprocess_helpers import last_json, run_python

from ring_ext.device import hand_device_to_every_process, training_device
from ring_ext.verl_config import compose_verl

RESOLVE = """
    import json
    import verl  # noqa: F401  (ring-ext's resolvers)
    from omegaconf import OmegaConf
    from ring_ext.verl_config import compose_verl
    cfg = compose_verl(["+recipe=ring1t"])
    OmegaConf.resolve(cfg)   # what verl's TaskRunner does with the config it received
    r = cfg.actor_rollout_ref.rollout
    print(json.dumps({"sleep": r.enable_sleep_mode, "strategy": cfg.actor_rollout_ref.actor.strategy,
                      "gpus": cfg.ray_kwargs.ray_init.num_gpus}))
"""


def test_the_driver_hands_its_device_to_the_environment_and_to_rays_runtime_env(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RING_EXT_DEVICE", "cuda")  # the driver's decision (here forced; detected otherwise)
    training_device.cache_clear()
    try:
        cfg = compose_verl(["+recipe=ring1t"])
        hand_device_to_every_process(cfg)
        assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.RING_EXT_DEVICE == "cuda"  # reaches an existing cluster
    finally:
        training_device.cache_clear()


def test_a_process_without_a_gpu_resolves_the_drivers_gpu_values() -> None:
    """verl's TaskRunner may run where no GPU is visible (a CPU-only head node): with the driver's RING_EXT_DEVICE
    it resolves `${ring_ext.accel:...}` to the GPU values; detecting on its own, it would take the CPU ones."""
    no_gpu = {"CUDA_VISIBLE_DEVICES": ""}
    handed = last_json(run_python(RESOLVE, env={**no_gpu, "RING_EXT_DEVICE": "cuda"}))
    own = last_json(run_python(RESOLVE, env={**no_gpu, "RING_EXT_DEVICE": ""}))
    assert handed == {"sleep": True, "strategy": handed["strategy"], "gpus": None}
    assert own["sleep"] is False and own["gpus"] == 1 and own != handed


@pytest.mark.parametrize("recipe", ["ring1t", "ring1t_rlvr ring1t_profile/rlvr=paper",
                                    "ring1t_rlhf ring1t_profile/rlhf=paper"])
def test_paper_profiles_pick_an_attention_that_needs_no_dense_packed_mask(
        recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Packed sequences (use_remove_padding) only with flash-attention's varlen kernel: sdpa would build a dense
    [T, T] mask per micro-batch (~4.4 GB at 66K tokens)."""
    from ring_ext import resolvers

    name, *profile = recipe.split()
    real_find_spec = resolvers.find_spec
    for device, flash, attention, packed in (("cuda", True, "flash_attention_2", True), ("cuda", False, "sdpa", False),
                                             ("cpu", True, "sdpa", False)):
        monkeypatch.setenv("RING_EXT_DEVICE", device)
        monkeypatch.setattr(resolvers, "find_spec",
                            lambda n, *a, f=flash: (real_find_spec("json") if f else None) if n == "flash_attn"
                            else real_find_spec(n, *a))
        training_device.cache_clear()
        model = compose_verl([f"+recipe={name}", *profile]).actor_rollout_ref.model
        assert (model.override_config.attn_implementation, model.use_remove_padding) == (attention, packed), device
    training_device.cache_clear()

"""The Ring-1T loop on verl's Megatron engine: `+recipe=ring1t_megatron` composes with verl's Megatron config
(`model_engine=megatron`, what verl 0.9.1's deprecated `ppo_megatron_trainer` selects), carries no FSDP key,
builds verl's Megatron actor config, and stops before Ray where it cannot run (CPU, no megatron-core). IcePop's
call through verl's Megatron engine worker: plugins/icepop/tests/test_verl_contract.py."""

from __future__ import annotations

import pytest

from ring_ext.config_check import unknown_keys
from ring_ext.device import training_device
from ring_ext.startup import check_megatron_engine
from ring_ext.verl_config import compose_verl


@pytest.fixture(autouse=True)
def _fresh_device():
    training_device.cache_clear()
    yield
    training_device.cache_clear()


def test_ring1t_megatron_is_the_ring1t_loop_on_verls_megatron_engine() -> None:
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import McoreActorConfig

    cfg = compose_verl(["+recipe=ring1t_megatron", "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2"])
    actor = cfg.actor_rollout_ref.actor
    assert cfg.model_engine == "megatron" and actor.strategy == "megatron"
    assert "fsdp_config" not in actor and "megatron" in cfg.actor_rollout_ref.ref
    # the loop itself is ring1t's: IcePop [0.5, 5] on C3PO++ partial rollouts
    assert (actor.policy_loss.loss_mode, actor.policy_loss.icepop_alpha, actor.policy_loss.icepop_beta) == (
        "icepop", 0.5, 5.0)
    assert cfg.trainer.v1.trainer_mode == "c3po" and cfg.trainer.v1.c3po.token_budget == 256
    assert unknown_keys(cfg) == []  # checked against verl's Megatron defaults
    built = omega_conf_to_dataclass(actor)
    assert isinstance(built, McoreActorConfig) and built.megatron.tensor_model_parallel_size == 2


def test_ring1t_keeps_fsdp2() -> None:
    cfg = compose_verl(["+recipe=ring1t"])
    assert cfg.model_engine == "dp" and cfg.actor_rollout_ref.actor.strategy == "fsdp2"
    assert cfg.actor_rollout_ref.actor.fsdp_config.strategy == "fsdp2" and unknown_keys(cfg) == []


def test_fsdp_keys_on_the_megatron_engine_are_named() -> None:
    """`+recipe=ring1t model_engine=megatron` would hand verl's Megatron actor FSDP knobs it never reads."""
    cfg = compose_verl(["+recipe=ring1t", "model_engine=megatron"])
    assert "actor_rollout_ref.actor.fsdp_config" in unknown_keys(cfg)


def test_the_megatron_engine_stops_before_ray_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RING_EXT_DEVICE", "cpu")
    with pytest.raises(ValueError, match=r"model_engine=megatron: verl's Megatron engine trains on CUDA GPUs only.*"
                                         r"\+recipe=ring1t instead of \+recipe=ring1t_megatron"):
        check_megatron_engine(compose_verl(["+recipe=ring1t_megatron"]))
    check_megatron_engine(compose_verl(["+recipe=ring1t"]))  # FSDP2: nothing to say


def test_the_megatron_engine_without_megatron_core_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RING_EXT_DEVICE", "cuda")
    monkeypatch.setitem(__import__("sys").modules, "megatron", None)  # as if megatron-core were not installed
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'ring-ext\[megatron\]'"):
        check_megatron_engine(compose_verl(["+recipe=ring1t_megatron"]))

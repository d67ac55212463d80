"""Checks that run in the driver inside verl's `validate_config`, before Ray or any worker starts.

`python -m verl.trainer.main_ppo` calls `verl.utils.config.validate_config(config, ...)` first thing;
ring-ext wraps it (lazily, on import) so a misconfigured plugin fails in seconds with the knob's name
instead of at the first actor update minutes later.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from ring_ext.known_plugins import provider, require
from ring_ext.patching import patch_after_import

logger = logging.getLogger("ring_ext")
Check = Callable[[Any], None]
_checks: dict[str, Check] = {}
def add_startup_check(name: str, check: Check) -> None:
    if not _checks:
        patch_after_import("verl.utils.config:validate_config", _run_checks_first)
    _checks[name] = check


def run_startup_checks(config: Any) -> None:
    for check in _checks.values():
        check(config)


def _run_checks_first(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def validate_config(config: Any, *args: Any, **kwargs: Any) -> Any:
        run_startup_checks(config)
        return original(config, *args, **kwargs)

    return validate_config


def check_policy_loss_registered(config: Any) -> None:
    """verl only looks the loss up at the first actor update; fail now, listing what exists."""
    from verl.trainer.ppo import core_algos

    mode = config.actor_rollout_ref.actor.policy_loss.get("loss_mode", "vanilla")
    if mode not in core_algos.POLICY_LOSS_REGISTRY:
        available = ", ".join(sorted(core_algos.POLICY_LOSS_REGISTRY))
        plugin = provider("policy_loss", mode)
        hint = (
            f"'{mode}' comes with the plugin {plugin.distribution}: {plugin.install_hint()}"
            if plugin is not None
            else "ring-ext plugins add theirs when installed: see `ring-ext plugins`"
        )
        raise ValueError(
            f"actor_rollout_ref.actor.policy_loss.loss_mode={mode!r} is not a registered policy loss. "
            f"Available: {available}. {hint}."
        )
    logger.warning("ring-ext: actor policy loss = %s", mode)


def check_config_resolves(config: Any) -> None:
    """verl resolves interpolations only inside its TaskRunner, after Ray started; a missing mandatory value
    (e.g. `${oc.env:RING1T_REWARD_MODEL_PATH}`) should stop the driver instead, naming the key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as exc:
        raise ValueError(f"the config does not resolve: {exc}") from exc


def check_trainer_mode_plugin(config: Any) -> None:
    """verl looks the v1 trainer mode up inside its TaskRunner, after Ray started; a mode that a ring-ext plugin
    provides fails here instead when that plugin is not installed."""
    mode = config.trainer.get("v1", {}).get("trainer_mode", "sync")
    if provider("trainer_mode", mode) is not None:
        require("trainer_mode", mode, f"trainer.v1.trainer_mode={mode!r}")
        logger.warning("ring-ext: v1 trainer mode = %s", mode)



def report_attention(config: Any) -> None:
    """On a GPU without flash-attn the recipes fall back to sdpa on padded micro-batches (see `ring_ext.resolvers`);
    say so at start, since packed sequences are what a user on a GPU expects."""
    from ring_ext.device import on_cpu

    model = config.actor_rollout_ref.model
    attention = (model.get("override_config", {}) or {}).get("attn_implementation")
    if not on_cpu() and attention == "sdpa" and not model.get("use_remove_padding", False):
        logger.warning("ring-ext: attention sdpa on padded micro-batches: flash-attn is not installed (pip install "
                       "flash-attn for packed sequences without a dense mask)")


def check_megatron_engine(config: Any) -> None:
    """`model_engine=megatron` (e.g. +recipe=ring1t_megatron) needs CUDA and megatron-core: say so before Ray
    rather than at the first worker's import."""
    if config.get("model_engine") != "megatron":
        return
    import importlib.util

    from ring_ext.device import on_cpu

    if on_cpu():
        raise ValueError("model_engine=megatron: verl's Megatron engine trains on CUDA GPUs only; on the CPU path "
                         "(ring-ext-cpu) use verl's FSDP2 engine, e.g. +recipe=ring1t instead of "
                         "+recipe=ring1t_megatron")
    try:
        found = importlib.util.find_spec("megatron.core") is not None
    except ModuleNotFoundError:  # no `megatron` package at all
        found = False
    if not found:
        raise ModuleNotFoundError("model_engine=megatron needs megatron-core: pip install 'ring-ext[megatron]'")

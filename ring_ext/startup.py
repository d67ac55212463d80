"""Checks that run in the driver inside verl's `validate_config`, before Ray or any worker starts.

`python -m verl.trainer.main_ppo` calls `verl.utils.config.validate_config(config, ...)` first thing;
ring-ext wraps it (lazily, on import) so a misconfigured plugin fails in seconds with the knob's name
instead of at the first actor update minutes later.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ring_ext.patching import after_import

logger = logging.getLogger("ring_ext")
Check = Callable[[Any], None]
_checks: dict[str, Check] = {}
# Losses ring-ext plugins provide, so a missing plugin gets an install hint instead of a bare "unknown".
PLUGIN_LOSSES = {"icepop": "ring-ext-icepop", "kpop": "ring-ext-icepop", "tis": "ring-ext-icepop"}
# v1 trainer modes ring-ext plugins provide: distribution and the module that registers the mode.
PLUGIN_TRAINER_MODES = {"c3po": ("ring-ext-c3po", "ring_ext_c3po")}


def _install_hint(distribution: str) -> str:
    return (f"pip install {distribution} "
            f"(in this repository: pip install -e plugins/{distribution.removeprefix('ring-ext-')})")


def add_startup_check(name: str, check: Check) -> None:
    if not _checks:
        after_import("verl.utils.config", _wrap_validate_config)
    _checks[name] = check


def run_startup_checks(config: Any) -> None:
    for check in _checks.values():
        check(config)


def _wrap_validate_config(module: ModuleType) -> None:
    original = module.validate_config
    if getattr(original, "__ring_ext_patched__", False):
        return

    @functools.wraps(original)
    def validate_config(config: Any, *args: Any, **kwargs: Any) -> Any:
        run_startup_checks(config)
        return original(config, *args, **kwargs)

    validate_config.__ring_ext_patched__ = True  # type: ignore[attr-defined]
    module.validate_config = validate_config


def check_policy_loss_registered(config: Any) -> None:
    """verl only looks the loss up at the first actor update; fail now, listing what exists."""
    from verl.trainer.ppo import core_algos

    mode = config.actor_rollout_ref.actor.policy_loss.get("loss_mode", "vanilla")
    if mode not in core_algos.POLICY_LOSS_REGISTRY:
        available = ", ".join(sorted(core_algos.POLICY_LOSS_REGISTRY))
        hint = (
            f"'{mode}' comes with the plugin {PLUGIN_LOSSES[mode]}: {_install_hint(PLUGIN_LOSSES[mode])}"
            if mode in PLUGIN_LOSSES
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
    import importlib.util

    mode = config.trainer.get("v1", {}).get("trainer_mode", "sync")
    if mode in PLUGIN_TRAINER_MODES:
        distribution, module = PLUGIN_TRAINER_MODES[mode]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"trainer.v1.trainer_mode={mode!r} comes with the plugin {distribution}, which is not "
                             f"installed: {_install_hint(distribution)}")
        logger.warning("ring-ext: v1 trainer mode = %s", mode)

"""ring-ext hook implementation of ring-ext-icepop: three policy losses, their call-site patch, a startup check."""

from __future__ import annotations

import logging
from typing import Any

from ring_ext.hookspecs import hookimpl
from ring_ext.registrar import Registrar

logger = logging.getLogger("ring_ext")


def check_mismatch_loss(config: Any) -> None:
    """At start: valid knobs, rollout log-probs produced, and the active loss logged with its parameters."""
    from ring_ext_icepop.config import variant_from_config
    from ring_ext_icepop.variants import VARIANTS, describe

    policy_loss = config.actor_rollout_ref.actor.policy_loss
    mode = policy_loss.get("loss_mode", "vanilla")
    if mode not in VARIANTS:
        return
    variant = variant_from_config(mode, policy_loss)
    if not config.actor_rollout_ref.rollout.get("calculate_log_probs", True):
        raise ValueError(f"policy loss '{mode}' needs actor_rollout_ref.rollout.calculate_log_probs=True")
    if config.algorithm.get("rollout_correction", {}).get("bypass_mode", False):
        raise ValueError(
            f"policy loss '{mode}' compares the trainer's recomputed log-probs with the rollout's; "
            "algorithm.rollout_correction.bypass_mode=True skips that recomputation (k would be 1 everywhere)"
        )
    logger.warning("ring-ext: policy loss %s on the rollout engine's log-probs", describe(variant))


@hookimpl
def ring_ext_register(registrar: Registrar) -> None:
    from ring_ext_icepop.loss import LOSSES

    for name, fn in LOSSES.items():
        registrar.policy_loss(name, fn)
    registrar.patch(
        "verl.workers.utils.losses:ppo_loss",
        "ring_ext_icepop.loss:with_rollout_log_probs",
        "rollout_log_probs_reach_the_loss",
        "verl/workers/utils/losses.py ppo_loss drops rollout_log_probs before the policy loss; for "
        "icepop/kpop/tis it hands them (and the entropy) to the loss of the same micro-batch",
    )
    registrar.startup_check("mismatch_loss_config", check_mismatch_loss)

"""ring-ext hook implementation of ring-ext-icepop: the mismatch policy losses, their call-site patch, a startup
check."""

from __future__ import annotations

import logging
from typing import Any

from ring_ext.hookspecs import hookimpl
from ring_ext.registrar import Registrar

logger = logging.getLogger("ring_ext")


def check_mismatch_loss(config: Any) -> None:
    """At start: valid knobs, rollout log-probs produced, per-lag bands only where C3PO++ writes lags, and the active
    loss logged with its parameters."""
    from ring_ext_icepop.config import variant_from_config
    from ring_ext_icepop.variants import SECTION, VARIANTS, describe

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
    trainer_mode = config.trainer.get("v1", {}).get("trainer_mode", "sync")
    if getattr(variant, "lag_bands", None) is not None and trainer_mode != "c3po":
        # only ring-ext-c3po writes a per-token lag (ring_ext.batch_fields): elsewhere the first update would stop
        raise ValueError(
            f"{SECTION}.icepop_lag_bands sets IcePop's band per policy-version lag, which only C3PO++ records per "
            f"token; trainer.v1.trainer_mode={trainer_mode} has none: set trainer.v1.trainer_mode=c3po "
            "(+recipe=ring1t does) or drop icepop_lag_bands"
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
        "verl/workers/utils/losses.py ppo_loss drops rollout_log_probs before the policy loss; for the "
        "mismatch losses it hands them (and the entropy, C3PO++'s lags) to the loss of the same micro-batch",
    )
    registrar.startup_check("mismatch_loss_config", check_mismatch_loss)

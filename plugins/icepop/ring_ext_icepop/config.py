"""Typed knobs of the mismatch losses, as a subclass of verl's `PolicyLossConfig`.

verl refuses unknown keys under `actor.policy_loss` unless its `_target_` names a dataclass that
declares them; point it here to set the band:

    actor_rollout_ref.actor.policy_loss._target_=ring_ext_icepop.config.MismatchPolicyLossConfig
    +actor_rollout_ref.actor.policy_loss.icepop_beta=2.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from verl.workers.config.actor import PolicyLossConfig

from ring_ext_icepop.core import MISMATCH_KINDS, MismatchConfig

KNOB_PREFIX = "actor_rollout_ref.actor.policy_loss"
DEFAULTS = MismatchConfig(kind="icepop")


@dataclass
class MismatchPolicyLossConfig(PolicyLossConfig):
    icepop_alpha: float = DEFAULTS.alpha
    icepop_beta: float = DEFAULTS.beta
    kpop_phi: float = DEFAULTS.phi
    tis_cap: float = DEFAULTS.cap

    def __post_init__(self) -> None:
        if self.loss_mode in MISMATCH_KINDS:
            mismatch_config(self.loss_mode, self)


def mismatch_config(kind: str, policy_loss: Any) -> MismatchConfig:
    """Build the core config from verl's policy-loss config (typed subclass, plain class or DictConfig)."""
    values = {
        "alpha": policy_loss.get("icepop_alpha", DEFAULTS.alpha),
        "beta": policy_loss.get("icepop_beta", DEFAULTS.beta),
        "phi": policy_loss.get("kpop_phi", DEFAULTS.phi),
        "cap": policy_loss.get("tis_cap", DEFAULTS.cap),
    }
    try:
        return MismatchConfig(kind=kind, **{k: float(v) for k, v in values.items()})  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"{KNOB_PREFIX} (loss_mode={kind}): {exc}. Knobs: {KNOB_PREFIX}.icepop_alpha, .icepop_beta, "
            f".kpop_phi, .tis_cap (got {values})"
        ) from exc

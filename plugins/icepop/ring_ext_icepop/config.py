"""verl's policy-loss config with the variants' knobs, generated from the table in `variants.py`.

verl refuses unknown keys under `actor.policy_loss` unless its `_target_` names a dataclass that declares them;
point it here to set a knob (`<variant>_<field>`, e.g. `icepop_beta`):

    actor_rollout_ref.actor.policy_loss._target_=ring_ext_icepop.config.MismatchPolicyLossConfig
    +actor_rollout_ref.actor.policy_loss.icepop_beta=2.0
    +actor_rollout_ref.actor.policy_loss.icepop_lag_bands='{0: [0.5, 5.0], 1: [0.3, 8.0]}'   # C3PO++ only
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from verl.workers.config.actor import PolicyLossConfig

from ring_ext_icepop.variants import SECTION, VARIANTS, Variant, make_variant


def knob_keys(kind: str) -> dict[str, str]:
    """verl key -> the variant's field, e.g. {"icepop_alpha": "alpha", "icepop_beta": "beta"}."""
    return {f"{kind}_{f.name}": f.name for f in dataclasses.fields(VARIANTS[kind])}


def _config_fields() -> list[tuple[str, Any, Any]]:
    out = []
    for kind, cls in VARIANTS.items():
        hints = typing.get_type_hints(cls)
        for key, name in knob_keys(kind).items():
            hint = hints[name]
            hint = str if typing.get_origin(hint) is Literal else hint  # OmegaConf has no Literal; the variant checks
            # OmegaConf types neither `X | None` nor tuples: a mapping knob (icepop_lag_bands) arrives as the user
            # wrote it and the variant checks and normalises it
            hint = hint if hint in (int, float, bool, str) else Any
            out.append((key, hint, dataclasses.field(default=getattr(cls(), name))))
    return out


def _post_init(self: Any) -> None:
    if self.loss_mode in VARIANTS:
        variant_from_config(self.loss_mode, self)


MismatchPolicyLossConfig = dataclasses.make_dataclass(
    "MismatchPolicyLossConfig", _config_fields(), bases=(PolicyLossConfig,), namespace={"__post_init__": _post_init})
MismatchPolicyLossConfig.__module__ = __name__  # Hydra's _target_ and Ray's pickling look it up here
MismatchPolicyLossConfig.__doc__ = "verl's PolicyLossConfig plus `<variant>_<knob>` for every mismatch-loss variant."


def variant_from_config(kind: str, policy_loss: Any) -> Variant:
    """The variant `kind` with its knobs read from verl's policy-loss config (typed, plain class or DictConfig);
    knobs left out take the variant's defaults."""
    defaults = MismatchPolicyLossConfig.__dataclass_fields__
    knobs = {name: policy_loss.get(key, defaults[key].default) for key, name in knob_keys(kind).items()}
    floats = {f.name for f in dataclasses.fields(VARIANTS[kind]) if defaults[f"{kind}_{f.name}"].type is float}
    # Hydra reads `icepop_beta=2` as an int: a number is a number (bools are refused by the variant)
    knobs = {k: float(v) if k in floats and type(v) is int else v for k, v in knobs.items()}
    try:
        return make_variant(kind, **knobs)
    except ValueError as exc:
        raise ValueError(f"{exc} (knobs under {SECTION}: {', '.join(knob_keys(kind))})") from exc

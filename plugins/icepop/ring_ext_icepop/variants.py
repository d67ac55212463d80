"""The mismatch-loss variants, one table (Ring-1T, arXiv 2510.18855, Eq. 1). Torch only, no verl.

Per token, k = pi_train(y_t; theta_old) / pi_infer(y_t; theta_old): the trainer's recomputed old log-prob against
the rollout engine's log-prob of the sampled token, log k = train_logp - infer_logp. A variant is a frozen
dataclass of typed knobs whose docstring states its math, and one rule deciding, per valid token, kept / rejected
below / rejected above and log M(k). `weights.mismatch_weights` applies it; the loss hands M(k) to verl's PPO-clip
as per-token importance weights.

verl's knob for a variant's field is `actor_rollout_ref.actor.policy_loss.<variant>_<field>` (`icepop_beta`).
Adding a variant = one dataclass here with its rule, one entry in VARIANTS, its tests in tests/test_variants.py;
the loss config, the start-up check and the install hints read the table.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple, Protocol

import torch

from ring_ext.knobs import check_knobs, knob
from ring_ext_icepop.fastops import binary_kl_both, flag

SECTION = "actor_rollout_ref.actor.policy_loss"
KPOP_MAX_LOG_WEIGHT = 20.0  # float32 overflow guard on K-Pop weights (same bound as verl's rollout_corr_helper)
_KL_RTOL = 1e-12  # slack on D_B <= phi: float64 rounding only, far below any meaningful phi


class Tokens(NamedTuple):
    log_k: torch.Tensor  # [B, T] compute dtype, 0.0 outside `valid`
    train: torch.Tensor  # [B, T] compute dtype (float64 for float64 inputs, else float32)
    infer: torch.Tensor
    valid: torch.Tensor  # [B, T] bool: in the response mask with a finite log k
    scratch: torch.Tensor  # [B, T] compute dtype, free to overwrite


class Rule(NamedTuple):
    kept: torch.Tensor  # [B, T] bool, within valid
    below: torch.Tensor  # rejected low, within valid
    above: torch.Tensor  # rejected high, within valid
    log_w: torch.Tensor  # log M(k) on kept tokens, bounded above everywhere (exp never overflows)


class Variant(Protocol):
    name: ClassVar[str]

    def rule(self, t: Tokens) -> Rule: ...


def _check(variant: object, name: str) -> None:
    check_knobs(variant, SECTION, prefix=f"{name}_")


@dataclass(frozen=True)
class IcePop:
    """M(k) = k if alpha <= k <= beta else 0, both edges inclusive.

    Decided in log space: keep iff log(alpha) <= log k <= log(beta), with the logs rounded to nearest in the compute
    dtype, so a log-ratio that *is* log(alpha) or log(beta) as that dtype holds it is kept and its neighbour one ulp
    outside is rejected. exp only sees log k clamped to log(beta)."""

    alpha: float = knob(0.5, gt=0)
    beta: float = knob(5.0, gt=0)
    name: ClassVar[str] = "icepop"

    def __post_init__(self) -> None:
        _check(self, self.name)
        if not self.alpha < self.beta:
            raise ValueError(f"icepop needs alpha < beta, got alpha={self.alpha} beta={self.beta} "
                             f"({SECTION}.icepop_alpha, .icepop_beta)")

    def rule(self, t: Tokens) -> Rule:
        lo = torch.tensor(math.log(self.alpha), dtype=t.log_k.dtype)  # rounded to nearest in the compute dtype
        hi = torch.tensor(math.log(self.beta), dtype=t.log_k.dtype)
        below = t.valid & flag(torch.lt, t.log_k, lo, out=t.scratch)
        above = t.valid & flag(torch.gt, t.log_k, hi, out=t.scratch)
        kept = t.valid & ~(below | above)
        return Rule(kept, below, above, torch.clamp(t.log_k, max=hi.item(), out=t.scratch))


@dataclass(frozen=True)
class KPop:
    """Keep iff D_B(p||q) <= phi and D_B(q||p) <= phi, with p = exp(train_logp), q = exp(infer_logp) and the binary
    KL D_B(p||q) = p log(p/q) + (1-p) log((1-p)/(1-q)); a kept token gets M(k) = k, as IcePop (K-Pop only changes
    which tokens are kept). Rejected tokens count as below when k < 1, above otherwise.

    D_B is computed in log space (log(1-p) = log1mexp(log p)) in `precision` (float64 by default; float32 is about
    2x faster and moves only decisions within ~1e-6 relative of phi). 0 * log(0 / x) = 0, so p == 1 adds no (1-p)
    term, while q == 1 with p < 1 gives D_B(p||q) = +inf (rejected); log-probs above 0 count as p = 1. D_B <= phi
    allows a relative slack of 1e-12 for float64 rounding. A kept token can still have a huge k (p = 1e-2,
    q = 1e-24): its weight is capped at exp(20), verl's SAFETY_BOUND, so the float32 weight stays finite."""

    phi: float = knob(0.5, gt=0)
    precision: Literal["float64", "float32"] = "float64"
    name: ClassVar[str] = "kpop"

    def __post_init__(self) -> None:
        _check(self, self.name)

    def rule(self, t: Tokens) -> Rule:
        dtype = torch.float64 if self.precision == "float64" else torch.float32
        # No zeroing of invalid tokens first: their D_B may come out nan, and `valid &` rejects them anyway.
        lp = t.train.to(dtype, copy=True).clamp_(max=0.0)
        lq = t.infer.to(dtype, copy=True).clamp_(max=0.0)
        limit = self.phi * (1.0 + _KL_RTOL)
        forward, backward = binary_kl_both(lp, lq)
        kept = t.valid & flag(torch.le, forward, limit, out=forward) & flag(torch.le, backward, limit, out=backward)
        rejected = t.valid & ~kept
        low = flag(torch.lt, t.log_k, 0.0, out=t.scratch)  # log_k is finite on valid tokens
        return Rule(kept, rejected & low, rejected & ~low,
                    torch.clamp(t.log_k, max=KPOP_MAX_LOG_WEIGHT, out=t.scratch))


@dataclass(frozen=True)
class TIS:
    """Truncated importance sampling: every valid token kept with M(k) = min(k, cap)."""

    cap: float = knob(2.0, gt=0)
    name: ClassVar[str] = "tis"

    def __post_init__(self) -> None:
        _check(self, self.name)

    def rule(self, t: Tokens) -> Rule:
        none = torch.zeros_like(t.valid)
        cap = torch.tensor(math.log(self.cap), dtype=t.log_k.dtype).item()  # log(cap) rounded to the compute dtype
        return Rule(t.valid, none, none.clone(), torch.clamp(t.log_k, max=cap, out=t.scratch))


VARIANTS: dict[str, type] = {v.name: v for v in (IcePop, KPop, TIS)}


def make_variant(kind: str, **knobs: object) -> Variant:
    """The variant `kind` with `knobs` (its own fields only), each checked."""
    if kind not in VARIANTS:
        raise ValueError(f"unknown mismatch loss kind {kind!r}; known kinds: {', '.join(VARIANTS)}")
    cls = VARIANTS[kind]
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(knobs) - set(fields))
    if unknown:
        raise ValueError(f"{kind} has no knob(s) {unknown}; its knobs: {fields}")
    return cls(**knobs)


def describe(variant: Variant) -> str:
    knobs = ", ".join(f"{f.name}={getattr(variant, f.name)}" for f in dataclasses.fields(variant))  # type: ignore
    return f"{variant.name}({knobs})"

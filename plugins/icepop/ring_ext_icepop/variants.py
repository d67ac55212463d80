"""The mismatch-loss variants, one table (Ring-1T, arXiv 2510.18855, Eq. 1). Torch only, no verl.

Per token, k = pi_train(y_t; theta_old) / pi_infer(y_t; theta_old): the trainer's recomputed old log-prob against
the rollout engine's log-prob of the sampled token, log k = train_logp - infer_logp. A variant is a frozen
dataclass of typed knobs whose docstring states its math, and one rule deciding, per valid token, kept / rejected
below / rejected above and log M(k). `weights.mismatch_weights` applies it; the loss hands M(k) to verl's PPO-clip
as per-token importance weights. Token variants decide each token alone; sequence variants (`seq_*`) also reject
whole responses, and a composition is a sequence rule applied to a token variant's rule (`reject_responses`).

verl's knob for a variant's field is `actor_rollout_ref.actor.policy_loss.<variant>_<field>` (`icepop_beta`).
Adding a variant = one dataclass here with its rule, one entry in VARIANTS, its tests in tests/;
the loss config, the start-up check and the install hints read the table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple, Protocol

import torch

from ring_ext.knobs import check_knobs, knob
from ring_ext_icepop.fastops import any_per_row, binary_kl_both, flag, per_row

SECTION = "actor_rollout_ref.actor.policy_loss"
KPOP_MAX_LOG_WEIGHT = 20.0  # float32 overflow guard on K-Pop weights (same bound as verl's rollout_corr_helper)
_KL_RTOL = 1e-12  # slack on D_B <= phi: float64 rounding only, far below any meaningful phi
_ICEPOP_BAND = (0.5, 5.0)  # the paper's [alpha, beta]


class Tokens(NamedTuple):
    log_k: torch.Tensor  # [B, T] compute dtype, 0.0 outside `valid`
    train: torch.Tensor  # [B, T] compute dtype (float64 for float64 inputs, else float32)
    infer: torch.Tensor
    valid: torch.Tensor  # [B, T] bool: in the response mask with a finite log k
    scratch: torch.Tensor  # [B, T] compute dtype, free to overwrite
    lag: torch.Tensor | None = None  # [B, T] int: C3PO++'s policy-version lag per token (ring_ext.batch_fields)


class Rule(NamedTuple):
    kept: torch.Tensor  # [B, T] bool, within valid
    below: torch.Tensor  # rejected low, within valid
    above: torch.Tensor  # rejected high, within valid
    log_w: torch.Tensor  # log M(k) on kept tokens, bounded above everywhere (exp never overflows)
    rejected_rows: torch.Tensor | None = None  # [B] bool: responses a sequence rule rejected; None: token variant


class LagsMissing(ValueError):
    """A band per version lag was asked for, but the batch carries no per-token lags (C3PO++ writes them)."""


class Variant(Protocol):
    name: ClassVar[str]

    def rule(self, t: Tokens) -> Rule: ...


def _check(variant: object, name: str, *bands: tuple[str, str]) -> None:
    """The typed knobs, then each (lower, upper) pair of field names strictly ordered."""
    check_knobs(variant, SECTION, prefix=f"{name}_")
    for lo, hi in bands:
        if not getattr(variant, lo) < getattr(variant, hi):
            raise ValueError(f"{name} needs {lo} < {hi}, got {lo}={getattr(variant, lo)} {hi}={getattr(variant, hi)} "
                             f"({SECTION}.{name}_{lo}, .{name}_{hi})")


def _lag_bands(name: str, bands: Mapping[Any, Any]) -> dict[int, tuple[float, float]]:
    """{lag: (lo, hi)} from a user's mapping ({0: [0.5, 5], 1: [0.3, 8]}), each band checked as IcePop's."""
    key = f"{SECTION}.{name}_lag_bands"
    out: dict[int, tuple[float, float]] = {}
    for lag, band in dict(bands).items():
        numbers = list(band) if isinstance(band, Sequence) and not isinstance(band, str) else []
        if isinstance(lag, bool) or not isinstance(lag, int) or lag < 0:
            raise ValueError(f"{key}: lags are integers >= 0, got {lag!r}")
        if len(numbers) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                        and x > 0 for x in numbers) or not numbers[0] < numbers[1]:
            raise ValueError(f"{key}[{lag}] must be [lo, hi] with 0 < lo < hi, got {band!r}")
        out[lag] = (float(numbers[0]), float(numbers[1]))
    if 0 not in out:
        raise ValueError(f"{key} needs a band for lag 0 (lags beyond the last entry use the last), got {dict(bands)!r}")
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class IcePop:
    """M(k) = k if alpha <= k <= beta else 0, both edges inclusive.

    Decided in log space: keep iff log(alpha) <= log k <= log(beta), with the logs rounded to nearest in the compute
    dtype, so a log-ratio that *is* log(alpha) or log(beta) as that dtype holds it is kept and its neighbour one ulp
    outside is rejected. exp only sees log k clamped to log(beta).

    `lag_bands` ({lag: [lo, hi]}, C3PO++ only) replaces [alpha, beta] by a band per policy-version lag: a token
    decoded N versions ago uses the entry of the largest lag <= N (so lags beyond the last entry use the last)."""

    alpha: float = knob(_ICEPOP_BAND[0], gt=0)
    beta: float = knob(_ICEPOP_BAND[1], gt=0)
    lag_bands: dict[int, tuple[float, float]] | None = None
    name: ClassVar[str] = "icepop"

    def __post_init__(self) -> None:
        _check(self, self.name, ("alpha", "beta"))
        if self.lag_bands is None:
            return
        bands = _lag_bands(self.name, self.lag_bands)
        object.__setattr__(self, "lag_bands", bands)  # normalised: sorted int lags, float bands
        # A band set in both places would leave one silently unread; the defaults mean "not set".
        if (self.alpha, self.beta) not in (_ICEPOP_BAND, bands[0]):
            raise ValueError(f"{SECTION}.icepop_alpha/icepop_beta are not read when icepop_lag_bands is set: put "
                             f"lag 0's band in icepop_lag_bands[0] (got [{self.alpha}, {self.beta}] and {bands[0]})")

    def band(self, lag: int) -> tuple[float, float]:
        """(lo, hi) of tokens decoded `lag` policy versions ago."""
        if self.lag_bands is None:
            return self.alpha, self.beta
        return self.lag_bands[max(k for k in self.lag_bands if k <= max(lag, 0))]

    def rule(self, t: Tokens) -> Rule:
        if self.lag_bands is None:
            lo = torch.tensor(math.log(self.alpha), dtype=t.log_k.dtype)  # rounded to nearest in the compute dtype
            hi = torch.tensor(math.log(self.beta), dtype=t.log_k.dtype)
        else:
            lo, hi = self._bands_per_token(t, max(self.lag_bands))
        below = t.valid & flag(torch.lt, t.log_k, lo, out=t.scratch)
        above = t.valid & flag(torch.gt, t.log_k, hi, out=t.scratch)
        kept = t.valid & ~(below | above)
        if hi.dim() == 0:
            return Rule(kept, below, above, torch.clamp(t.log_k, max=hi.item(), out=t.scratch))
        return Rule(kept, below, above, torch.minimum(t.log_k, hi, out=t.scratch))

    def _bands_per_token(self, t: Tokens, top: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] log lo and log hi, looked up by each token's lag (in the compute dtype, rounded as above)."""
        if t.lag is None:
            raise LagsMissing(f"{SECTION}.icepop_lag_bands needs C3PO++'s per-token policy-version lags, and this "
                              "batch has none: use trainer.v1.trainer_mode=c3po or drop icepop_lag_bands")
        # lag < 0 cannot come from C3PO++ (trained version minus decoding version) and padding holds 0; a lag past
        # the last entry takes the last band
        index = t.lag.to(t.log_k.device).clamp(0, top).view(-1)
        tables = ([math.log(self.band(lag)[side]) for lag in range(top + 1)] for side in (0, 1))
        # index_select on the flat index: 4x faster on CPU than indexing with the [B, T] tensor
        lo, hi = (torch.tensor(x, dtype=t.log_k.dtype, device=index.device).index_select(0, index).view_as(t.log_k)
                  for x in tables)
        return lo, hi


def _by_side(rejected: torch.Tensor, t: Tokens, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(below, above): `rejected` tokens split by k < 1 / k >= 1, for a rule with no band edge to name the side."""
    low = flag(torch.lt, t.log_k, 0.0, out=out)  # log_k is finite on valid tokens
    return rejected & low, rejected & ~low


@dataclass(frozen=True)
class KPop:
    """Keep iff D_B(p||q) <= phi and D_B(q||p) <= phi, with p = exp(train_logp), q = exp(infer_logp) and the binary
    KL D_B(p||q) = p log(p/q) + (1-p) log((1-p)/(1-q)); a kept token gets M(k) = k, as IcePop (K-Pop only changes
    which tokens are kept). Rejected tokens count as below when k < 1, above otherwise.

    D_B is computed in log space (log(1-p) = log1mexp(log p)) in `precision` (float64 by default; float32 is about
    2x faster and moves only decisions within 1e-4 relative of phi, tested). 0 * log(0 / x) = 0, so p == 1 adds no
    (1-p) term, while q == 1 with p < 1 gives D_B(p||q) = +inf (rejected); log-probs above 0 count as p = 1. D_B <= phi
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
        below, above = _by_side(t.valid & ~kept, t, out=t.scratch)
        return Rule(kept, below, above, torch.clamp(t.log_k, max=KPOP_MAX_LOG_WEIGHT, out=t.scratch))


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


# --- sequence variants: a response rejected whole ----------------------------------------------------------------


def reject_responses(rule: Rule, t: Tokens, rows: torch.Tensor) -> Rule:
    """`rule` with every token of the responses `rows` ([B] bool) rejected too. A token that only its response
    rejected counts below if k < 1, above otherwise; the tokens `rule` rejected keep their side. Only `kept` changes
    the weights (a rejected response keeps its place in every denominator, as a rejected token does)."""
    dropped = rule.kept & per_row(rows, rule.kept)
    below, above = _by_side(dropped, t)  # a fresh buffer: rule.log_w may live in t.scratch
    return Rule(rule.kept ^ dropped, rule.below | below, rule.above | above, rule.log_w, rows)  # dropped <= kept


def _any_rejected(rule: Rule) -> torch.Tensor:
    """[B] bool: the responses with a token `rule` rejected."""
    return any_per_row(rule.below | rule.above)


@dataclass(frozen=True)
class SeqGeo:
    """Reject a whole response whose geometric-mean k over its valid tokens V_i lies outside [alpha, beta]:
    keep response i iff log(alpha) <= (1/|V_i|) sum_{t in V_i} log k_t <= log(beta), both edges inclusive, the sum
    and the mean in float64. A kept response's tokens get M = 1: a trust region on the response, no importance
    weight (`seq_geo_tis` adds one). A response with no valid token is never rejected: it has nothing to train."""

    alpha: float = knob(0.999, gt=0)
    beta: float = knob(1.001, gt=0)
    name: ClassVar[str] = "seq_geo"

    def __post_init__(self) -> None:
        _check(self, self.name, ("alpha", "beta"))

    def rejected(self, t: Tokens) -> torch.Tensor:
        """[B] bool: the responses whose geometric-mean k lies outside [alpha, beta]."""
        n = torch.count_nonzero(t.valid, dim=-1)
        mean = t.log_k.sum(dim=-1, dtype=torch.float64).div_(n.clamp(min=1))  # log_k is 0.0 outside valid
        return (n > 0) & ((mean < math.log(self.alpha)) | (mean > math.log(self.beta)))

    def rule(self, t: Tokens) -> Rule:
        none = torch.zeros_like(t.valid)
        return reject_responses(Rule(t.valid, none, none.clone(), t.scratch.zero_()), t, self.rejected(t))


@dataclass(frozen=True)
class SeqMax:
    """Reject a whole response any of whose valid tokens has k outside [lo, hi] (IcePop's test on that band, both
    edges inclusive); the tokens of a kept response keep IcePop's M(k) = k, all of them lying inside the band."""

    lo: float = knob(0.1, gt=0)
    hi: float = knob(10.0, gt=0)
    name: ClassVar[str] = "seq_max"

    def __post_init__(self) -> None:
        _check(self, self.name, ("lo", "hi"))

    def rule(self, t: Tokens) -> Rule:
        band = IcePop(self.lo, self.hi).rule(t)
        return reject_responses(band, t, _any_rejected(band))


@dataclass(frozen=True)
class SeqMaxIcePop:
    """seq_max's hard bound, then IcePop's band: a response with a valid token whose k lies outside [lo, hi] is
    rejected whole; in the others each token gets IcePop's M(k) = k if alpha <= k <= beta else 0. Needs
    lo <= alpha < beta <= hi: the response bound is the wider one (a narrower one would leave the band unread)."""

    lo: float = knob(0.1, gt=0)
    hi: float = knob(10.0, gt=0)
    alpha: float = knob(_ICEPOP_BAND[0], gt=0)
    beta: float = knob(_ICEPOP_BAND[1], gt=0)
    name: ClassVar[str] = "seq_max_icepop"

    def __post_init__(self) -> None:
        _check(self, self.name, ("lo", "hi"), ("alpha", "beta"))
        if not (self.lo <= self.alpha and self.beta <= self.hi):
            raise ValueError(f"{self.name} needs lo <= alpha and beta <= hi (the response bound is the wider), got "
                             f"[{self.lo}, {self.hi}] and [{self.alpha}, {self.beta}] ({SECTION}.{self.name}_lo, ...)")

    def rule(self, t: Tokens) -> Rule:
        rows = _any_rejected(IcePop(self.lo, self.hi).rule(t))  # first: both rules write t.scratch
        return reject_responses(IcePop(self.alpha, self.beta).rule(t), t, rows)


@dataclass(frozen=True)
class SeqGeoTIS:
    """seq_geo's response test, then TIS's weights: a response whose geometric-mean k lies outside [alpha, beta] is
    rejected whole; the tokens of the others get M(k) = min(k, cap)."""

    alpha: float = knob(0.999, gt=0)
    beta: float = knob(1.001, gt=0)
    cap: float = knob(2.0, gt=0)
    name: ClassVar[str] = "seq_geo_tis"

    def __post_init__(self) -> None:
        _check(self, self.name, ("alpha", "beta"))

    def rule(self, t: Tokens) -> Rule:
        rows = SeqGeo(self.alpha, self.beta).rejected(t)
        return reject_responses(TIS(self.cap).rule(t), t, rows)


VARIANTS: dict[str, type] = {v.name: v for v in (IcePop, KPop, TIS, SeqGeo, SeqMax, SeqMaxIcePop, SeqGeoTIS)}


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
    """"icepop(alpha=0.5, beta=5.0)": every knob, an optional one only when set (the start-up log line)."""
    knobs = ", ".join(f"{f.name}={getattr(variant, f.name)}" for f in dataclasses.fields(variant)  # type: ignore
                      if not (f.default is None and getattr(variant, f.name) is None))
    return f"{variant.name}({knobs})"

"""Mask and weight math behind the `icepop`, `kpop` and `tis` policy losses (Ring-1T, arXiv 2510.18855, Eq. 1).

Torch only, no verl: the verl adapter (`ring_ext_icepop.loss`) feeds `mismatch_weights(...).weight` to verl's
PPO-clip loss as per-token importance weights and logs `mismatch_metrics`.

Per token, k = pi_train(y_t; theta_old) / pi_infer(y_t; theta_old), with `train_logp` the trainer's recomputed
old log-prob and `infer_logp` the rollout engine's log-prob of the sampled token; log k = train_logp - infer_logp.

- icepop: M(k) = k if alpha <= k <= beta else 0 (both edges inclusive).
- kpop:   with p = exp(train_logp), q = exp(infer_logp) and the binary KL
          D_B(p||q) = p log(p/q) + (1-p) log((1-p)/(1-q)), keep iff D_B(p||q) <= phi and D_B(q||p) <= phi;
          a kept token gets the same M(k) = k as IcePop (our choice: K-Pop only changes *which* tokens are kept).
- tis:    every valid token kept with weight min(k, cap).

Numerics (the rules the tests pin down):
- Compute dtype: float64 for float64 inputs, float32 otherwise (bf16/fp16 are upcast first).
- IcePop band, decided in log space: keep iff lo <= log_k <= hi, where log_k = train_logp - infer_logp in the compute
  dtype and lo, hi are math.log(alpha), math.log(beta) rounded to nearest in the compute dtype. So a log-ratio that
  *is* log(alpha) or log(beta) as that dtype can hold it is kept, and its neighbour one ulp outside is rejected.
- A rejected log-ratio is never exponentiated as is (it may be +-1e4): exp only sees it clamped from above (icepop:
  to log(beta), kpop: to 20, tis: to log(cap)), and the kept mask then zeroes its weight.
- K-Pop's D_B is computed in float64 in log space (log(1-p) = log1mexp(log p)); 0 * log(0 / x) = 0, so p == 1
  contributes no (1-p) term, while q == 1 with p < 1 gives D_B(p||q) = +inf (rejected). Log-probs above 0 (numerical
  noise) count as p = 1 there. D_B <= phi is tested with a relative slack of 1e-12 so that phi equal to an analytic
  D_B is not lost to float64 rounding of an algebraically equal formula.
- K-Pop's binary KL barely sees tokens with tiny p, so a kept token can have a huge k (p = 1e-2, q = 1e-24); its
  weight is capped at exp(KPOP_MAX_LOG_WEIGHT) = exp(20) (verl's SAFETY_BOUND) so the float32 weight stays finite.
- invalid: inside response_mask with a non-finite train_logp - infer_logp (nan/inf log-prob, or overflow); such a
  token is weight 0 and neither kept nor below/above. Padding is none of kept/below/above/invalid, weight 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, get_args

import torch

MismatchKind = Literal["icepop", "kpop", "tis"]
MISMATCH_KINDS: tuple[str, ...] = get_args(MismatchKind)

KPOP_MAX_LOG_WEIGHT = 20.0  # float32 overflow guard on K-Pop weights (same bound as verl's rollout_corr_helper)
_KL_RTOL = 1e-12  # slack on D_B <= phi: float64 rounding only, far below any meaningful phi
_K3_CLAMP = 20.0  # log-ratio clamp for the k3 metric only


@dataclass(frozen=True)
class MismatchConfig:
    kind: MismatchKind
    alpha: float = 0.5  # icepop: lower bound on k (inclusive)
    beta: float = 5.0  # icepop: upper bound on k (inclusive)
    phi: float = 0.5  # kpop: max binary KL, both directions (inclusive)
    cap: float = 2.0  # tis: truncation C of the weight min(k, C)

    def __post_init__(self) -> None:
        # Only the knobs of the chosen kind are checked: the adapter passes all four from one config.
        if self.kind not in MISMATCH_KINDS:
            raise ValueError(f"unknown mismatch kind {self.kind!r}; known kinds: {', '.join(MISMATCH_KINDS)}")
        knobs = {"icepop": ("alpha", "beta"), "kpop": ("phi",), "tis": ("cap",)}[self.kind]
        for name in knobs:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{self.kind} {name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{self.kind} {name} must be finite, got {value}")
            if value <= 0:
                raise ValueError(f"{self.kind} {name} must be > 0, got {value}")
        if self.kind == "icepop" and not self.alpha < self.beta:
            raise ValueError(f"icepop needs alpha < beta, got alpha={self.alpha} beta={self.beta}")


@dataclass(frozen=True, eq=False)  # eq=False: elementwise tensor == has no single truth value
class MismatchWeights:
    weight: torch.Tensor  # [B, T] float32, detached: 0 on rejected, invalid and padding tokens
    kept: torch.Tensor  # [B, T] bool: valid, inside the mask (and inside response_mask)
    below: torch.Tensor  # [B, T] bool: rejected low (icepop: k < alpha; kpop: rejected with k < 1)
    above: torch.Tensor  # [B, T] bool: rejected high (icepop: k > beta; kpop: rejected with k >= 1)
    invalid: torch.Tensor  # [B, T] bool: inside response_mask but non-finite train/infer log-prob (or log k)
    log_ratio: torch.Tensor  # [B, T] float32 log k, 0.0 where invalid or padding


def _flag(compare: Callable[..., torch.Tensor], x: torch.Tensor, other: Any, out: torch.Tensor | None = None) -> torch.Tensor:
    """compare(x, other) as a new bool tensor (the same values as `compare(x, other)`).

    On CPU the comparison first writes 0.0/1.0 into `out` (a scratch tensor of x's shape and dtype, which it
    overwrites; a new one if None) and then casts that to bool: torch's CPU comparison kernels are several times
    slower when they write bool than when they write float (torch 2.13, 262k float32 elements, one thread: ~200 us
    against ~35 us + ~25 us for the cast). Other devices compare directly and leave `out` alone.
    """
    if x.device.type != "cpu":
        return compare(x, other)
    return compare(x, other, out=torch.empty_like(x) if out is None else out).bool()


def _u8(flag: torch.Tensor) -> torch.Tensor:
    """A bool tensor viewed as uint8 0/1, to multiply floats by: `x.mul_(_u8(flag))` is x where flag and 0.0 (or
    -0.0) elsewhere for finite x, with no temporary, and on CPU several times faster than a product with the bool."""
    return flag.view(torch.uint8)


def _log1mexp(x: torch.Tensor, e: torch.Tensor, e_bar: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (Maechler 2012); -inf at x == 0.

    e = exp(x) and e_bar = -expm1(x) = 1 - exp(x) are passed in (the caller needs them too); all three are kept."""
    scratch = torch.empty_like(x)
    near_zero = _flag(torch.gt, x, -math.log(2.0), out=scratch)
    far = torch.neg(e, out=scratch).log1p_()  # log1p(-e)
    near = torch.log(e_bar)
    return torch.where(near_zero, near, far, out=near)


def _nan_to_zero_(x: torch.Tensor) -> torch.Tensor:
    return x.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)


def _binary_kl_both(lp: torch.Tensor, lq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D_B(p||q), D_B(q||p)) from log-probs lp, lq <= 0 (float64), with 0 * log(0 / x) = 0.

    Exact for finite lp, lq; a nan in lp or lq gives nan (the caller masks such tokens out). Overwrites lp."""
    p, q = torch.exp(lp), torch.exp(lq)
    p_bar, q_bar = torch.expm1(lp).neg_(), torch.expm1(lq).neg_()  # 1 - p, 1 - q without cancellation
    log_bar_ratio = _log1mexp(lp, p, p_bar).sub_(_log1mexp(lq, q, q_bar))  # log((1-p)/(1-q))
    log_ratio = lp.sub_(lq)  # log(p/q)
    # p == 1 (p_bar == 0) makes the (1-p) term 0 whatever q is. There, and only there, p_bar * log_bar_ratio is
    # 0 * -inf or 0 * nan = nan: where p_bar > 0, log1mexp(lp) is finite, so log_bar_ratio is finite or +inf
    # (q == 1). nan -> 0 is therefore exactly `where(p_bar > 0, p_bar * log_bar_ratio, 0)`; +-inf are kept.
    # The same holds for q_bar with the roles swapped (log_bar_ratio finite or -inf where q_bar > 0).
    # (The products reuse p, q, p_bar, q_bar in place; -(a + b) == -a - b exactly.)
    forward = p.mul_(log_ratio).add_(_nan_to_zero_(p_bar.mul_(log_bar_ratio)))
    backward = q.mul_(log_ratio).add_(_nan_to_zero_(q_bar.mul_(log_bar_ratio))).neg_()
    return forward, backward


def mismatch_weights(
    train_logp: torch.Tensor, infer_logp: torch.Tensor, response_mask: torch.Tensor, cfg: MismatchConfig
) -> MismatchWeights:
    """Per-token mask and weight of `cfg.kind` (see the module docstring for the exact rules)."""
    if train_logp.shape != infer_logp.shape or train_logp.shape != response_mask.shape:
        raise ValueError(
            f"shapes differ: train_logp {tuple(train_logp.shape)}, infer_logp {tuple(infer_logp.shape)}, "
            f"response_mask {tuple(response_mask.shape)}"
        )
    dtype = torch.float64 if torch.float64 in (train_logp.dtype, infer_logp.dtype) else torch.float32
    train, infer = train_logp.detach().to(dtype), infer_logp.detach().to(dtype)
    mask = response_mask.detach().bool()

    # Few passes and two [B, T] float tensors in all (raw becomes log_k, scratch ends as the weight): on CPU every
    # extra temporary of that size costs its page faults too once the allocator hands memory back to the system.
    raw = train - infer
    scratch = torch.abs(raw)
    finite = _flag(torch.lt, scratch, math.inf, out=scratch)  # isfinite: inf - x, x - inf, nan, overflow all fail
    valid = mask & finite
    invalid = mask & ~valid
    # log_k = where(valid, raw, 0): nan/inf zeroed first (0 * inf would be nan), then raw * 1 == raw on valid
    # tokens and +-0.0 elsewhere; + 0.0 turns -0.0 into 0.0.
    log_k = raw.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).mul_(_u8(valid)).add_(0.0)
    zeros = torch.zeros_like(mask)

    if cfg.kind == "icepop":
        lo = torch.tensor(math.log(cfg.alpha), dtype=dtype)  # rounded to nearest in the compute dtype
        hi = torch.tensor(math.log(cfg.beta), dtype=dtype)
        below = valid & _flag(torch.lt, log_k, lo, out=scratch)
        above = valid & _flag(torch.gt, log_k, hi, out=scratch)
        kept = valid & ~(below | above)
        # == log_k on kept tokens; bounded (never exp(1e4)) elsewhere. hi.item() is hi's value exactly.
        log_w = torch.clamp(log_k, max=hi.item(), out=scratch)
    elif cfg.kind == "kpop":
        # No zeroing of invalid tokens first: their D_B may come out nan, and `valid &` rejects them anyway.
        lp = train.to(torch.float64, copy=True).clamp_(max=0.0)
        lq = infer.to(torch.float64, copy=True).clamp_(max=0.0)
        limit = cfg.phi * (1.0 + _KL_RTOL)
        forward, backward = _binary_kl_both(lp, lq)
        kept = valid & _flag(torch.le, forward, limit, out=forward) & _flag(torch.le, backward, limit, out=backward)
        del lp, lq, forward, backward
        rejected = valid & ~kept
        low = _flag(torch.lt, log_k, 0.0, out=scratch)  # log_k is finite, so ~low is log_k >= 0
        below = rejected & low
        above = rejected & ~low
        log_w = torch.clamp(log_k, max=KPOP_MAX_LOG_WEIGHT, out=scratch)
    else:  # tis
        kept, below, above = valid, zeros, zeros.clone()
        cap = torch.tensor(math.log(cfg.cap), dtype=dtype).item()  # log(cap) rounded to the compute dtype
        log_w = torch.clamp(log_k, max=cap, out=scratch)  # min(log_k, log cap); log_k is never nan

    # where(kept, exp(log_w), 0): exp(log_w) is finite (log_w is bounded above), so a product with 0/1 is exact.
    weight = log_w.exp_().mul_(_u8(kept)).to(torch.float32)
    return MismatchWeights(
        weight=weight, kept=kept, below=below, above=above, invalid=invalid, log_ratio=log_k.to(torch.float32)
    )


def mismatch_metrics(
    w: MismatchWeights,
    response_mask: torch.Tensor,
    *,
    entropy: torch.Tensor | None = None,
    train_logp: torch.Tensor | None = None,
    prefix: str = "mismatch/",
) -> dict[str, float]:
    """Scalar diagnostics of one `mismatch_weights` result, as plain finite floats (0.0 for an empty set).

    n = tokens in response_mask; V = valid tokens (in the mask, finite log-ratio), n_V = |V|; r = log_ratio;
    w = weight; R = rejected valid tokens (V and not kept); K = kept tokens. Means over V are in float64.

    - k1 = mean_V(-r) = mean_V(infer_logp - train_logp)            (estimates KL(pi_infer || pi_train))
    - k3 = mean_V(exp(c) - 1 - c), c = clamp(r, -20, 20)            (estimates the same KL, always >= 0)
    - masked_below_frac, masked_above_frac, invalid_frac, kept_frac = |below|, |above|, |invalid|, |kept| / n
    - ess = (sum_V w)^2 / (n_V * sum_V w^2)                        (0.0 if n_V == 0 or sum_V w^2 == 0)
    - log_ratio_min, log_ratio_max, log_ratio_mean = min_V r, max_V r, mean_V r
    - masked_entropy_mean, kept_entropy_mean = mean_R entropy, mean_K entropy   (only when `entropy` is given;
      tokens with a non-finite entropy are left out)
    - masked_train_logp_mean = mean_R train_logp   (only when `train_logp` is given; non-finite entries left out)
    """
    return _metrics_and_host(w, response_mask, entropy=entropy, train_logp=train_logp, prefix=prefix)[0]


def _metrics_and_host(
    w: MismatchWeights,
    response_mask: torch.Tensor,
    *,
    entropy: torch.Tensor | None = None,
    train_logp: torch.Tensor | None = None,
    prefix: str = "mismatch/",
    extra: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """`mismatch_metrics`, plus the host values of its reductions ("n" is the token count) and of the caller's
    0-dim tensors `extra` (as "extra:<key>"), all fetched in the same single device-to-host transfer."""
    mask = response_mask.detach().bool()
    valid = mask & ~w.invalid
    rejected = valid & ~w.kept
    # log_ratio is 0.0 outside V and weight is 0.0 outside K (the MismatchWeights contract, which mismatch_weights
    # guarantees and the tests check), so sums over V are plain sums and only the extrema need the V mask.
    # Two float64 [B, T] scratch tensors serve all the float64 passes: on CPU each [B, T] temporary also costs its
    # page faults once the allocator has handed freed memory back to the system.
    r32, w32 = w.log_ratio.detach(), w.weight.detach()
    if r32.numel():
        pad = _u8(valid).to(r32.dtype).reciprocal_().sub_(1.0)  # 0.0 on V, +inf elsewhere
        shifted = r32 + pad
        min_r = shifted.min()  # r on V, +inf elsewhere: +inf when V is empty
        max_r = torch.sub(r32, pad, out=shifted).max()  # r on V, -inf elsewhere
        del pad, shifted
    else:  # .min() of an empty tensor raises
        min_r, max_r = r32.new_tensor(math.inf), r32.new_tensor(-math.inf)
    a, b = torch.empty_like(r32, dtype=torch.float64), torch.empty_like(r32, dtype=torch.float64)
    r = a.copy_(r32)
    n, n_invalid = mask.sum(), (w.invalid & mask).sum()
    # All reductions go into one tensor and cross to the host once (one device sync per call, not ~15).
    parts: dict[str, torch.Tensor] = {
        "n": n,
        "n_valid": n - n_invalid,
        "below": (w.below & mask).sum(),
        "above": (w.above & mask).sum(),
        "invalid": n_invalid,
        "kept": (w.kept & mask).sum(),
        "sum_r": r.sum(),
    }
    c = r.clamp_(-_K3_CLAMP, _K3_CLAMP)
    parts["sum_k3"] = torch.expm1(c, out=b).sub_(c).sum()  # expm1: no cancellation for small c
    wt = a.copy_(w32)
    parts["sum_w"] = wt.sum()
    parts["sum_w2"] = wt.square_().sum()
    parts["min_r"], parts["max_r"] = min_r, max_r
    # Caller-supplied tensors: means over their finite entries only.
    extra_means = {"masked_entropy_mean": (entropy, rejected), "kept_entropy_mean": (entropy, w.kept & mask)}
    extra_means["masked_train_logp_mean"] = (train_logp, rejected)
    for key, (values, sel) in extra_means.items():
        if values is not None:
            values = b.copy_(values.detach())  # float64
            sel = sel & _flag(torch.lt, torch.abs(values, out=a), math.inf, out=a)  # & isfinite(values)
            # == where(sel, values, 0): non-finite entries are zeroed first, so the product with 0/1 is exact
            selected = values.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).mul_(_u8(sel))
            parts[f"{key}:sum"] = selected.sum()
            parts[f"{key}:count"] = sel.sum()
    for key, value in (extra or {}).items():
        parts[f"extra:{key}"] = value.detach().to(a.device)
    # stack promotes to float64 (the sums are float64): counts stay exact up to 2^53.
    host = dict(zip(parts, torch.stack(list(parts.values())).tolist()))

    def ratio(num: float, den: float) -> float:
        return num / den if den else 0.0

    n, n_valid = host["n"], host["n_valid"]
    ess = ratio(host["sum_w"] ** 2, n_valid * host["sum_w2"])
    out = {
        "k1": -ratio(host["sum_r"], n_valid),
        "k3": ratio(host["sum_k3"], n_valid),
        "masked_below_frac": ratio(host["below"], n),
        "masked_above_frac": ratio(host["above"], n),
        "invalid_frac": ratio(host["invalid"], n),
        "kept_frac": ratio(host["kept"], n),
        "ess": ess if math.isfinite(ess) else 0.0,
        "log_ratio_min": host["min_r"] if n_valid else 0.0,
        "log_ratio_max": host["max_r"] if n_valid else 0.0,
        "log_ratio_mean": ratio(host["sum_r"], n_valid),
    }
    for key in extra_means:
        if f"{key}:sum" in parts:
            out[key] = ratio(host[f"{key}:sum"], host[f"{key}:count"])
    return {f"{prefix}{key}": float(value) for key, value in out.items()}, host

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
- A rejected log-ratio is never exponentiated (it may be +-1e4): it is replaced by 0 with torch.where first.
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
from typing import Literal, get_args

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


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (Maechler 2012); -inf at x == 0."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _binary_kl_both(lp: torch.Tensor, lq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D_B(p||q), D_B(q||p)) from finite log-probs lp, lq <= 0 (float64), with 0 * log(0 / x) = 0."""
    p, q = torch.exp(lp), torch.exp(lq)
    p_bar, q_bar = -torch.expm1(lp), -torch.expm1(lq)  # 1 - p, 1 - q without cancellation
    log_ratio, log_bar_ratio = lp - lq, _log1mexp(lp) - _log1mexp(lq)  # log(p/q), log((1-p)/(1-q))
    # p == 1 makes the (1-p) term 0 whatever q is; the unselected branch may be nan (-inf - -inf).
    forward = p * log_ratio + torch.where(p_bar > 0, p_bar * log_bar_ratio, 0.0)
    backward = -q * log_ratio - torch.where(q_bar > 0, q_bar * log_bar_ratio, 0.0)
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

    raw = train - infer
    valid = mask & torch.isfinite(raw)  # inf - x, x - inf, nan and overflow all land here
    invalid = mask & ~valid
    log_k = torch.where(valid, raw, torch.zeros_like(raw))
    zeros = torch.zeros_like(mask)

    if cfg.kind == "icepop":
        lo = torch.tensor(math.log(cfg.alpha), dtype=dtype)  # rounded to nearest in the compute dtype
        hi = torch.tensor(math.log(cfg.beta), dtype=dtype)
        below = valid & (log_k < lo)
        above = valid & (log_k > hi)
        kept = valid & ~below & ~above
        log_w = torch.where(kept, log_k, torch.zeros_like(log_k))  # never exp a rejected log-ratio
    elif cfg.kind == "kpop":
        lp = torch.where(valid, train, torch.zeros_like(train)).to(torch.float64).clamp(max=0.0)
        lq = torch.where(valid, infer, torch.zeros_like(infer)).to(torch.float64).clamp(max=0.0)
        limit = cfg.phi * (1.0 + _KL_RTOL)
        forward, backward = _binary_kl_both(lp, lq)
        kept = valid & (forward <= limit) & (backward <= limit)
        rejected = valid & ~kept
        below = rejected & (log_k < 0)
        above = rejected & (log_k >= 0)
        log_w = torch.where(kept, log_k.clamp(max=KPOP_MAX_LOG_WEIGHT), torch.zeros_like(log_k))
    else:  # tis
        kept, below, above = valid, zeros, zeros.clone()
        log_w = torch.minimum(log_k, torch.tensor(math.log(cfg.cap), dtype=dtype))

    weight = torch.where(kept, torch.exp(log_w), torch.zeros_like(log_w)).to(torch.float32)
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
    mask = response_mask.detach().bool()
    valid = mask & ~w.invalid
    rejected = valid & ~w.kept
    r = w.log_ratio.detach().to(torch.float64)
    wt = w.weight.detach().to(torch.float64)
    c = r.clamp(-_K3_CLAMP, _K3_CLAMP)
    inf = r.new_tensor([math.inf])
    # All reductions go into one tensor and cross to the host once (one device sync per call, not ~15).
    parts: dict[str, torch.Tensor] = {
        "n": mask.sum(),
        "n_valid": valid.sum(),
        "below": (w.below & mask).sum(),
        "above": (w.above & mask).sum(),
        "invalid": (w.invalid & mask).sum(),
        "kept": (w.kept & mask).sum(),
        "sum_r": torch.where(valid, r, 0.0).sum(),
        "sum_k3": torch.where(valid, torch.expm1(c) - c, 0.0).sum(),  # expm1: no cancellation for small c
        "sum_w": torch.where(valid, wt, 0.0).sum(),
        "sum_w2": torch.where(valid, wt.square(), 0.0).sum(),
        "min_r": torch.cat([torch.where(valid, r, math.inf).flatten(), inf]).min(),  # +inf when V is empty
        "max_r": torch.cat([torch.where(valid, r, -math.inf).flatten(), -inf]).max(),
    }
    # Caller-supplied tensors: means over their finite entries only.
    extra = {"masked_entropy_mean": (entropy, rejected), "kept_entropy_mean": (entropy, w.kept & mask)}
    extra["masked_train_logp_mean"] = (train_logp, rejected)
    for key, (values, sel) in extra.items():
        if values is not None:
            values = values.detach().to(device=r.device, dtype=torch.float64)
            sel = sel & torch.isfinite(values)
            parts[f"{key}:sum"] = torch.where(sel, values, 0.0).sum()
            parts[f"{key}:count"] = sel.sum()
    host = dict(zip(parts, torch.stack([v.to(torch.float64) for v in parts.values()]).tolist()))

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
    for key in extra:
        if f"{key}:sum" in parts:
            out[key] = ratio(host[f"{key}:sum"], host[f"{key}:count"])
    return {f"{prefix}{key}": float(value) for key, value in out.items()}

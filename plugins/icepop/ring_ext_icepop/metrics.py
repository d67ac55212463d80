"""Diagnostics of the mismatch weights, logged by the loss under `actor/mismatch/`. Torch only, no verl.

n = tokens in response_mask; V = valid tokens (in the mask, finite log-ratio), n_V = |V|; r = log_ratio;
w = weight; R = rejected valid tokens (V and not kept); K = kept tokens. Sums are accumulated in float64.

- k1 = mean_V(-r) = mean_V(infer_logp - train_logp)            (estimates KL(pi_infer || pi_train))
- k3 = mean_V(exp(c) - 1 - c), c = clamp(r, -20, 20)            (estimates the same KL, always >= 0)
- masked_below_frac, masked_above_frac, invalid_frac, kept_frac = |below|, |above|, |invalid|, |kept| / n
- ess = (sum_V w)^2 / (n_V * sum_V w^2)                        (0.0 if n_V == 0 or sum_V w^2 == 0)
- log_ratio_min, log_ratio_max, log_ratio_mean = min_V r, max_V r, mean_V r
- masked_entropy_mean, kept_entropy_mean = mean_R entropy, mean_K entropy   (only when `entropy` is given;
  tokens with a non-finite entropy are left out)
- masked_train_logp_mean = mean_R train_logp   (only when `train_logp` is given; non-finite entries left out)
- seq_rejected_frac = responses a sequence variant rejected whole / responses with a token in the mask
  (sequence variants only)
Every value is a plain finite float, 0.0 for an empty set. `metrics_by_lag` splits the first five per policy
version lag (C3PO++ batches): how much masking comes from stale tokens, how much from the engine; with a band per
lag it adds that lag's band (band_lo, band_hi).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from ring_ext_icepop.fastops import any_per_row, count, flag, u8
from ring_ext_icepop.weights import MismatchWeights

BY_LAG = ("k1", "k3", "kept_frac", "masked_below_frac", "masked_above_frac")  # <prefix>lag<N>/<metric>
_K3_CLAMP = 20.0  # log-ratio clamp for the k3 metric only


def mismatch_metrics(w: MismatchWeights, response_mask: torch.Tensor, *, entropy: torch.Tensor | None = None,
                     train_logp: torch.Tensor | None = None, prefix: str = "mismatch/") -> dict[str, float]:
    """The diagnostics above for one `mismatch_weights` result."""
    return metrics_and_host(w, response_mask, entropy=entropy, train_logp=train_logp, prefix=prefix)[0]


def _masked_mean_parts(values: torch.Tensor, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of `values` over `sel` and its finite entries."""
    v = values.detach()
    v = v if v.dtype == torch.float64 else v.float()
    sel = sel & flag(torch.lt, torch.abs(v), math.inf)  # & isfinite(v)
    # == where(sel, v, 0): non-finite entries are zeroed first, so the product with 0/1 is exact
    return v.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).mul_(u8(sel)).sum(dtype=torch.float64), count(sel)


def _extrema_over(r: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of r over `valid`: +inf/-inf when it is empty."""
    inf = r.new_tensor(math.inf)
    return torch.where(valid, r, inf).min(), torch.where(valid, r, -inf).max()


def metrics_and_host(
    w: MismatchWeights,
    response_mask: torch.Tensor,
    *,
    entropy: torch.Tensor | None = None,
    train_logp: torch.Tensor | None = None,
    prefix: str = "mismatch/",
    extra: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """`mismatch_metrics`, plus the host values of its reductions ("n" is the token count) and of the caller's
    0-dim tensors `extra` (as "extra:<key>"), all fetched in one device-to-host transfer."""
    mask = response_mask.detach().bool()
    # The MismatchWeights contract: the flags partition the mask (kept, below, above, invalid, each within it),
    # log_ratio is 0.0 outside V and weight 0.0 outside K. So sums over V are plain sums, the rejected tokens are
    # below | above, and an extremum of r over all tokens is one over V unless it is 0.0 (checked below).
    rejected = w.below | w.above
    r32, w32 = w.log_ratio.detach(), w.weight.detach()
    buf, buf2 = torch.empty_like(r32, dtype=torch.float64), torch.empty_like(r32, dtype=torch.float64)
    n, n_invalid = count(mask), count(w.invalid)
    parts: dict[str, torch.Tensor] = {"n": n, "n_valid": n - n_invalid, "below": count(w.below),
                                      "above": count(w.above), "invalid": n_invalid, "kept": count(w.kept)}
    if r32.numel():
        parts["min_r"], parts["max_r"] = torch.aminmax(r32)
    else:  # aminmax of an empty tensor raises
        parts["min_r"], parts["max_r"] = r32.new_tensor(math.inf), r32.new_tensor(-math.inf)
    r = buf.copy_(r32)
    parts["sum_r"] = r.sum()
    c = r.clamp_(-_K3_CLAMP, _K3_CLAMP)
    # exp(c) - 1 - c in float64: exp is vectorised where expm1 is not (5x faster on CPU); the cancellation costs
    # ~2e-16 absolute per token, far below any k3 worth reading.
    parts["sum_k3"] = torch.exp(c, out=buf2).sub_(1.0).sub_(c).sum()
    wt = buf.copy_(w32)
    parts["sum_w"] = wt.sum()
    parts["sum_w2"] = torch.dot(wt.view(-1), wt.view(-1)) if wt.numel() else wt.sum()
    means = {"masked_entropy_mean": (entropy, rejected), "kept_entropy_mean": (entropy, w.kept),
             "masked_train_logp_mean": (train_logp, rejected)}
    for key, (values, sel) in means.items():
        if values is not None:
            parts[f"{key}:sum"], parts[f"{key}:count"] = _masked_mean_parts(values, sel)
    if w.seq_rejected is not None:
        parts["seq_rejected"], parts["seq_n"] = count(w.seq_rejected), count(any_per_row(mask))
    for key, value in (extra or {}).items():
        parts[f"extra:{key}"] = value.detach().to(buf.device)
    # stack promotes to float64 (the sums are float64): counts stay exact up to 2^53.
    host = dict(zip(parts, torch.stack([p.to(torch.float64) for p in parts.values()]).tolist()))
    if host["n_valid"] < r32.numel() and 0.0 in (host["min_r"], host["max_r"]):
        # a 0.0 extremum may be padding's: the rare batch whose valid log-ratios all share one sign pays a pass
        host["min_r"], host["max_r"] = (float(x) for x in _extrema_over(r32, mask & ~w.invalid))

    def ratio(num: float, den: float) -> float:
        return num / den if den else 0.0

    n_all, n_valid = host["n"], host["n_valid"]
    ess = ratio(host["sum_w"] ** 2, n_valid * host["sum_w2"])
    out = {
        "k1": -ratio(host["sum_r"], n_valid),
        "k3": ratio(host["sum_k3"], n_valid),
        "masked_below_frac": ratio(host["below"], n_all),
        "masked_above_frac": ratio(host["above"], n_all),
        "invalid_frac": ratio(host["invalid"], n_all),
        "kept_frac": ratio(host["kept"], n_all),
        "ess": ess if math.isfinite(ess) else 0.0,
        "log_ratio_min": host["min_r"] if n_valid else 0.0,
        "log_ratio_max": host["max_r"] if n_valid else 0.0,
        "log_ratio_mean": ratio(host["sum_r"], n_valid),
    }
    for key in means:
        if f"{key}:sum" in parts:
            out[key] = ratio(host[f"{key}:sum"], host[f"{key}:count"])
    if "seq_rejected" in host:
        out["seq_rejected_frac"] = ratio(host["seq_rejected"], host["seq_n"])
    return {f"{prefix}{key}": float(value) for key, value in out.items()}, host


def metrics_by_lag(w: MismatchWeights, mask: torch.Tensor, lag: torch.Tensor, prefix: str,
                   band: Callable[[int], tuple[float, float]] | None = None) -> dict[str, float]:
    """`BY_LAG` per policy-version lag, as `<prefix>lag<N>/<metric>`; with `band` (lag -> (lo, hi)), the band each
    lag used as `<prefix>lag<N>/band_lo` and `band_hi`."""
    if lag.shape != mask.shape:
        raise ValueError(f"per-token version lags {tuple(lag.shape)} != response mask {tuple(mask.shape)}")
    out: dict[str, float] = {}
    for value in torch.unique(lag[mask]).tolist():
        lag_prefix = f"{prefix}lag{int(value)}/"
        sel = mask & (lag == value)
        # the metrics sum log_ratio and weight unmasked (both are 0 outside the response): zero them outside sel too
        subset = dataclasses.replace(w, weight=w.weight * sel, log_ratio=w.log_ratio * sel, kept=w.kept & sel,
                                     below=w.below & sel, above=w.above & sel, invalid=w.invalid & sel,
                                     seq_rejected=None)  # a response spans lags: no per-lag response count
        metrics = mismatch_metrics(subset, sel, prefix=lag_prefix)
        out |= {f"{lag_prefix}{key}": metrics[f"{lag_prefix}{key}"] for key in BY_LAG}
        if band is not None:
            out[f"{lag_prefix}band_lo"], out[f"{lag_prefix}band_hi"] = (float(x) for x in band(int(value)))
    return out

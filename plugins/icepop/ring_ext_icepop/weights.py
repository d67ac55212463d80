"""Per-token mask and weight of a mismatch-loss variant (the rules: `variants.py`). Torch only, no verl.

Numerics (the rules the tests pin down):
- Compute dtype: float64 for float64 inputs, float32 otherwise (bf16/fp16 are upcast first).
- invalid: inside response_mask with a non-finite train_logp - infer_logp (nan/inf log-prob, or overflow); such a
  token is weight 0 and neither kept nor below/above. Padding is none of kept/below/above/invalid, weight 0.
- A rejected log-ratio is never exponentiated as is (it may be +-1e4): each variant bounds log M(k) from above,
  and the kept mask then zeroes the weight of every other token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ring_ext_icepop.fastops import flag, u8
from ring_ext_icepop.variants import Tokens, Variant


@dataclass(frozen=True, eq=False)  # eq=False: elementwise tensor == has no single truth value
class MismatchWeights:
    weight: torch.Tensor  # [B, T] float32, detached: 0 on rejected, invalid and padding tokens
    kept: torch.Tensor  # [B, T] bool: valid, inside the variant's mask (and inside response_mask)
    below: torch.Tensor  # [B, T] bool: rejected low (icepop: k < alpha; kpop: rejected with k < 1)
    above: torch.Tensor  # [B, T] bool: rejected high (icepop: k > beta; kpop: rejected with k >= 1)
    invalid: torch.Tensor  # [B, T] bool: inside response_mask but non-finite train/infer log-prob (or log k)
    log_ratio: torch.Tensor  # [B, T] float32 log k, 0.0 where invalid or padding
    seq_rejected: torch.Tensor | None = None  # [B] bool: responses a sequence variant rejected whole (else None)


def mismatch_weights(
    train_logp: torch.Tensor, infer_logp: torch.Tensor, response_mask: torch.Tensor, variant: Variant,
    lag: torch.Tensor | None = None,
) -> MismatchWeights:
    """The variant's per-token weights M(k) and flags, from the trainer's and the engine's log-probs (and C3PO++'s
    per-token policy-version lags, for a variant whose band depends on them)."""
    if train_logp.shape != infer_logp.shape or train_logp.shape != response_mask.shape:
        raise ValueError(
            f"shapes differ: train_logp {tuple(train_logp.shape)}, infer_logp {tuple(infer_logp.shape)}, "
            f"response_mask {tuple(response_mask.shape)}"
        )
    if lag is not None and lag.shape != response_mask.shape:
        raise ValueError(f"per-token version lags {tuple(lag.shape)} != response mask {tuple(response_mask.shape)}")
    dtype = torch.float64 if torch.float64 in (train_logp.dtype, infer_logp.dtype) else torch.float32
    train, infer = train_logp.detach().to(dtype), infer_logp.detach().to(dtype)
    mask = response_mask.detach().bool()

    # Two [B, T] float tensors in all: raw becomes log_k, scratch ends as the weight.
    raw = train - infer
    scratch = torch.abs(raw)
    finite = flag(torch.lt, scratch, float("inf"), out=scratch)  # isfinite: inf - x, x - inf, nan, overflow all fail
    valid = mask & finite
    invalid = mask & ~valid
    # log_k = where(valid, raw, 0): nan/inf zeroed first (0 * inf would be nan), then raw * 1 == raw on valid
    # tokens and +-0.0 elsewhere; + 0.0 turns -0.0 into 0.0.
    log_k = raw.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).mul_(u8(valid)).add_(0.0)
    kept, below, above, log_w, rows = variant.rule(Tokens(log_k, train, infer, valid, scratch, lag))
    # where(kept, exp(log_w), 0): exp(log_w) is finite (log_w is bounded above), so a product with 0/1 is exact.
    weight = log_w.exp_().mul_(u8(kept)).to(torch.float32)
    return MismatchWeights(weight=weight, kept=kept, below=below, above=above, invalid=invalid,
                           log_ratio=log_k.to(torch.float32), seq_rejected=rows)

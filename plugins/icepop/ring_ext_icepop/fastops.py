"""CPU-fast elementwise helpers of the mismatch weights and metrics; the measured reasons are in docs/icepop.md.

On CPU, torch's comparison kernels are several times slower writing bool than writing float, a product with a bool
tensor is slower than with its uint8 view, a bool `.sum()` first copies the tensor to int64, and every extra [B, T]
temporary costs its page faults once the allocator has handed memory back. These helpers avoid each of those; on
other devices they fall back to the plain op.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch


def flag(compare: Callable[..., torch.Tensor], x: torch.Tensor, other: Any,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """compare(x, other) as a new bool tensor. On CPU the comparison writes 0.0/1.0 into `out` (a scratch tensor of
    x's shape and dtype, overwritten; a new one if None) and is then cast to bool."""
    if x.device.type != "cpu":
        return compare(x, other)
    return compare(x, other, out=torch.empty_like(x) if out is None else out).bool()


def u8(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor viewed as uint8 0/1, to multiply floats by: `x.mul_(u8(m))` is x where m and 0.0 (or -0.0)
    elsewhere for finite x, with no temporary."""
    return mask.view(torch.uint8)


def count(mask: torch.Tensor) -> torch.Tensor:
    """The number of True entries, as a 0-dim int64 tensor (no int64 copy of the mask, unlike `mask.sum()`)."""
    return torch.count_nonzero(mask)


def any_per_row(mask: torch.Tensor) -> torch.Tensor:
    """[B] bool: mask.any(dim=-1) of a [B, T] bool tensor; on CPU the max of its uint8 view (bool `any` over a dim
    is ~40x slower)."""
    if mask.device.type != "cpu" or mask.shape[-1] == 0:  # amax refuses an empty dim
        return mask.any(dim=-1)
    return mask.view(torch.uint8).amax(dim=-1).bool()


def per_row(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] rows spread to the [B, T] shape of `like`, contiguous: on CPU a bool op against a broadcast operand is
    ~25x slower than against a contiguous one, which costs one memset-speed copy."""
    return rows[:, None].expand_as(like).contiguous()


def nan_to_zero_(x: torch.Tensor) -> torch.Tensor:
    return x.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)


def log1mexp(x: torch.Tensor, e: torch.Tensor, e_bar: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (Maechler 2012); -inf at x == 0.

    e = exp(x) and e_bar = -expm1(x) = 1 - exp(x) are passed in (the caller needs them too); all three are kept."""
    scratch = torch.empty_like(x)
    near_zero = flag(torch.gt, x, -math.log(2.0), out=scratch)
    far = torch.neg(e, out=scratch).log1p_()  # log1p(-e)
    near = torch.log(e_bar)
    return torch.where(near_zero, near, far, out=near)


def binary_kl_both(lp: torch.Tensor, lq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D_B(p||q), D_B(q||p)) from log-probs lp, lq <= 0, with 0 * log(0 / x) = 0, in lp's dtype.

    Exact for finite lp, lq; a nan in lp or lq gives nan (the caller masks such tokens out). Overwrites lp."""
    p, q = torch.exp(lp), torch.exp(lq)
    p_bar, q_bar = torch.expm1(lp).neg_(), torch.expm1(lq).neg_()  # 1 - p, 1 - q without cancellation
    log_bar_ratio = log1mexp(lp, p, p_bar).sub_(log1mexp(lq, q, q_bar))  # log((1-p)/(1-q))
    log_ratio = lp.sub_(lq)  # log(p/q)
    # p == 1 (p_bar == 0) makes the (1-p) term 0 whatever q is. There, and only there, p_bar * log_bar_ratio is
    # 0 * -inf or 0 * nan = nan: where p_bar > 0, log1mexp(lp) is finite, so log_bar_ratio is finite or +inf
    # (q == 1). nan -> 0 is therefore exactly `where(p_bar > 0, p_bar * log_bar_ratio, 0)`; +-inf are kept.
    # The same holds for q_bar with the roles swapped (log_bar_ratio finite or -inf where q_bar > 0).
    # (The products reuse p, q, p_bar, q_bar in place; -(a + b) == -a - b exactly.)
    forward = p.mul_(log_ratio).add_(nan_to_zero_(p_bar.mul_(log_bar_ratio)))
    backward = q.mul_(log_ratio).add_(nan_to_zero_(q_bar.mul_(log_bar_ratio))).neg_()
    return forward, backward

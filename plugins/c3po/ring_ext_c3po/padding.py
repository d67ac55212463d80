"""verl's padding rows for data-parallel splits, with C3PO++'s per-token version lag cut to the row's one token.

With dp > 1 verl pads a batch whose size does not divide (`verl/trainer/ppo/padding_utils.py`,
`construct_minimal_padding_template`): it copies a real row and rebuilds the per-token fields it knows at one token,
but keeps a field it does not know, as `rollout_policy_lag`, at the source row's length. The lag then no longer lines
up with the row's response mask and IcePop's per-lag diagnostics refuse the whole batch. The padding row's response
mask is 0, so its lag (0) never counts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from ring_ext.batch_fields import ROLLOUT_POLICY_LAG


def lag_cut_to_the_padding_row(construct: Callable[..., tuple[dict, dict]]) -> Callable[..., tuple[dict, dict]]:
    """Wraps verl's `construct_minimal_padding_template`: the lag gets the padding row's response shape."""

    @functools.wraps(construct)
    def construct_with_lag(source_td: dict, source_tag: dict, eos_token_id: int, *args: Any, **kw: Any):
        sample, tag = construct(source_td, source_tag, eos_token_id, *args, **kw)
        lag = sample.get(ROLLOUT_POLICY_LAG)
        if isinstance(lag, torch.Tensor):
            sample[ROLLOUT_POLICY_LAG] = torch.zeros(sample["responses"].shape, dtype=lag.dtype)
        return sample, tag

    return construct_with_lag

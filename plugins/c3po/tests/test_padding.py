"""Data-parallel size > 1: verl's padding row keeps C3PO++'s per-token lag in step with its response mask.

verl pads a batch that does not divide by dp with rows from its real `construct_minimal_padding_template` (called
here through verl's module, patched by ring-ext-c3po at `import verl`); ring-ext-icepop's per-lag diagnostics then
read the padded batch as the loss does. Stands in for a dp = 2 trainer: the row verl builds, not the gloo ranks.
"""

from __future__ import annotations

import pytest
import torch
import verl  # noqa: F401  (loads ring-ext-c3po, which patches verl's padding on import)
from ring_ext_icepop.metrics import metrics_by_lag
from ring_ext_icepop.variants import IcePop
from ring_ext_icepop.weights import mismatch_weights

from ring_ext.batch_fields import ROLLOUT_POLICY_LAG


def _row(n: int) -> dict:
    g = torch.Generator().manual_seed(n)
    return {
        "prompts": torch.arange(5), "responses": torch.arange(n), "input_ids": torch.arange(5 + n),
        "attention_mask": torch.ones(5 + n, dtype=torch.int64), "position_ids": torch.arange(5 + n),
        "response_mask": torch.ones(n, dtype=torch.int64), "rollout_log_probs": -torch.rand(n, generator=g),
        ROLLOUT_POLICY_LAG: torch.tensor([1] * (n // 2) + [0] * (n - n // 2)),
    }


def test_the_padding_row_s_lag_has_its_response_shape_and_the_diagnostics_accept_the_batch() -> None:
    from verl.trainer.ppo import padding_utils

    assert getattr(padding_utils.construct_minimal_padding_template, "__ring_ext_patched__", False)
    source = _row(37)
    pad, tag = padding_utils.construct_minimal_padding_template(source, {"uid": "a"}, eos_token_id=2)
    assert tag["is_padding"] and pad["responses"].shape == (1,)
    assert pad[ROLLOUT_POLICY_LAG].shape == pad["response_mask"].shape == (1,)
    assert pad[ROLLOUT_POLICY_LAG].dtype == source[ROLLOUT_POLICY_LAG].dtype
    assert source[ROLLOUT_POLICY_LAG].shape == (37,)  # the source row is left whole

    # a micro-batch as the loss reads it: a shorter real row and the padding row, each field padded to its own
    # widest row (TensorDict's nested `to_padded_tensor`, as ring-ext-icepop's loss calls it)
    real = _row(20)

    def diagnostics(padding_row: dict) -> dict[str, float]:
        rows = [real, padding_row]

        def stack(key: str) -> torch.Tensor:
            width = max(r[key].numel() for r in rows)
            return torch.stack([torch.nn.functional.pad(r[key].double(), (0, width - r[key].numel())) for r in rows])

        mask, infer = stack("response_mask").bool(), stack("rollout_log_probs")
        w = mismatch_weights(infer + 0.1 * mask, infer, mask, IcePop(alpha=0.5, beta=5.0))
        return metrics_by_lag(w, mask, stack(ROLLOUT_POLICY_LAG).long(), prefix="")

    metrics = diagnostics(pad)
    assert metrics["lag1/kept_frac"] == metrics["lag0/kept_frac"] == 1.0
    assert metrics["lag1/k1"] == pytest.approx(-0.1)  # only the real row's tokens count

    # verl's own row keeps the source's 37 lags against a 1-token mask: the diagnostics refuse the micro-batch
    unpatched, _ = padding_utils.construct_minimal_padding_template.__wrapped__(source, {"uid": "a"}, eos_token_id=2)
    with pytest.raises(ValueError, match=r"per-token version lags \(2, 37\) != response mask \(2, 20\)"):
        diagnostics(unpatched)

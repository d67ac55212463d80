"""End to end on CPU: `loss_mode=icepop` as one override of plain GRPO (`+recipe=ring1t ring1t_loop=grpo`),
through verl's main_ppo and vLLM: the session's GRPO run (tests/shared_runs.py, also checked by
tests/test_e2e_cpu.py). The loss on C3PO++ partial rollouts: plugins/c3po/tests/test_c3po_e2e.py."""

from __future__ import annotations

import math

import pytest
from shared_runs import GRPO_STEPS, Run

pytestmark = pytest.mark.e2e

SCHEMA = (
    "k1", "k3", "masked_below_frac", "masked_above_frac", "invalid_frac", "kept_frac", "ess",
    "log_ratio_min", "log_ratio_max", "log_ratio_mean", "masked_train_logp_mean",
)  # fmt: skip


def test_icepop_run_logs_the_mismatch_schema_with_finite_values(grpo_run: Run) -> None:
    assert "ring-ext: policy loss icepop(alpha=0.5, beta=5.0) on the rollout engine's log-probs" in grpo_run.log
    assert sorted(grpo_run.steps) == list(range(1, GRPO_STEPS + 1))
    for data in grpo_run.steps.values():
        for name in SCHEMA:
            value = data[f"actor/mismatch/{name}"]
            assert math.isfinite(value), name
        # Same weights in trainer and vLLM (bf16 kernels apart): nothing near the [0.5, 5] band edges.
        assert data["actor/mismatch/kept_frac"] == 1.0
        assert abs(data["actor/mismatch/log_ratio_mean"]) < 0.05
        assert data["actor/mismatch/k3"] >= 0.0

"""End to end on CPU: verl's unchanged `main_ppo` entry point, `+recipe=ring1t ring1t_loop=grpo`, a real vLLM server.

A few GRPO steps on the tiny default with a large learning rate, so the policy moves far enough that
a rollout engine left on stale weights would be caught by the log-prob comparison. The tiny Qwen2 without the length
tail (`length_tail=False`): the default's scaled EOS embedding makes each step's change of the hidden states move the
EOS logit 30x, and at these rates the policy flipped between always and never ending within 1-3 steps (CI runs at
3e-2 and 3e-3: a deterministic one-token answer, Pearson correlation undefined, every advantage zero).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from shared_runs import GRPO_STEPS, Run

from ring_ext.tiny import build_tiny_default

pytestmark = pytest.mark.e2e

STEPS = GRPO_STEPS
# vLLM (bf16 kernels) vs the FSDP actor (bf16 forward) on the same weights: measured on this CPU
# ~0.01 mean |log-ppl| difference and Pearson >= 0.998 of token probabilities.
MAX_LOG_PPL_GAP = 0.02
MIN_PEARSON = 0.99
SYNC_METRICS = ("rollout_corr/training_log_ppl", "rollout_corr/log_ppl_abs_diff",
                "training/rollout_actor_probs_pearson_corr")


@pytest.fixture(scope="module")
def run(grpo_run: Run) -> dict:
    """The session's GRPO run (conftest.py): IcePop by one override keeps every token here (the engine holds the
    trainer's weights), so it trains as vanilla GRPO; plugins/icepop/tests/test_e2e_icepop.py checks that."""
    for step, data in sorted(grpo_run.steps.items()):  # the file logger writes a NaN or an infinity as null
        print(f"step {step}:", {k: data.get(k) for k in (*SYNC_METRICS, "timing_s/step")})
    return {"steps": grpo_run.steps, "workdir": grpo_run.workdir}


def test_every_step_logs_finite_metrics(run: dict) -> None:
    steps = run["steps"]
    assert sorted(steps) == list(range(1, STEPS + 1))
    for data in steps.values():
        for key in ("actor/pg_loss", "actor/grad_norm", "critic/score/mean", "response_length/mean", "timing_s/gen"):
            assert torch.isfinite(torch.tensor(float(data[key]))), key
        # a step where every group's samples scored alike has all-zero GRPO advantages, hence no gradient
        if data["critic/advantages/max"] > data["critic/advantages/min"]:
            assert data["actor/grad_norm"] > 0
        assert data["response_length/mean"] > 0
    assert sum(d["actor/grad_norm"] > 0 for d in steps.values()) >= STEPS // 2


def test_actor_weights_changed(run: dict) -> None:
    initial = load_file(build_tiny_default(length_tail=False).model_dir / "model.safetensors")
    hf_dir = run["workdir"] / "ckpt" / f"global_step_{STEPS}" / "actor" / "huggingface"
    trained = load_file(next(hf_dir.glob("*.safetensors")))
    common = sorted(set(initial) & set(trained))
    assert common, f"no common tensors between {list(initial)[:3]} and {list(trained)[:3]}"
    changed = [k for k in common if not torch.equal(initial[k].float(), trained[k].float())]
    assert len(changed) >= len(common) // 2, f"only {len(changed)}/{len(common)} tensors changed"
    assert all(torch.isfinite(trained[k].float()).all() for k in common)


def test_rollout_logprobs_follow_the_synced_weights(run: dict) -> None:
    """vLLM's log-probs match the trainer's at every step, while the policy itself moves a lot."""
    steps = run["steps"]
    for step, data in steps.items():
        missing = [k for k in SYNC_METRICS if data.get(k) is None]
        assert not missing, f"step {step}: {missing} not finite (logged as null)"
        assert data["training/rollout_actor_probs_pearson_corr"] >= MIN_PEARSON, step
        assert data["rollout_corr/log_ppl_abs_diff"] <= MAX_LOG_PPL_GAP, step
    drift = abs(steps[STEPS]["rollout_corr/training_log_ppl"] - steps[1]["rollout_corr/training_log_ppl"])
    assert drift > 5 * MAX_LOG_PPL_GAP, f"policy barely moved ({drift}); the sync check would prove nothing"

"""The mismatch experiment harness (experiments/mismatch): the knob, and short runs of every method.

Real tiny Qwen3-MoE after the harness's SFT warm-up (built once, ~20 s, then cached with the tiny default),
real ring-ext losses through verl's registry.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `experiments` lives at the repo root

from experiments.mismatch import run as harness
from experiments.mismatch.engine import InferenceEngine
from experiments.mismatch.grpo import METRICS, GRPOConfig
from experiments.mismatch.policy import TRAIN_ROWS, exact_kl, left_pad, prompt_ids, score
from experiments.mismatch.sft import sft_policy

METHODS = ["vanilla", "tis", "icepop", "icepop:0.5:2", "kpop:0.02", "kpop:0.5"]
SMALL = {"prompts": 2, "group": 3, "max_new": 8}


@pytest.fixture(scope="module")
def policy():
    torch.set_num_threads(1)
    return sft_policy()


def _sample(model, tok, knob: float, n: int = 8):
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    ids, mask = left_pad([prompt_ids(tok, r) for r in TRAIN_ROWS[:n]], pad)
    engine = InferenceEngine(model, knob)
    return engine, engine.rollout(ids, mask, 10, eos, pad, torch.Generator().manual_seed(0))


def test_knob_zero_gives_bit_identical_train_and_inference_log_probs(policy) -> None:
    model, tok = policy
    engine, (batch, infer_logp, infer_all) = _sample(model, tok, 0.0)
    with torch.no_grad():
        train_logp, train_all = score(model, batch, full=True)
    assert engine.model.dtype == torch.float32 and batch.response_mask.sum() > 8
    assert torch.equal(train_logp, infer_logp) and torch.equal(train_all, infer_all)
    assert exact_kl(infer_all, train_all)[batch.response_mask].max().item() == 0.0
    assert torch.isfinite(train_logp[batch.response_mask]).all()


def test_measured_kl_grows_monotonically_with_the_knob(policy) -> None:
    model, tok = policy
    _, (batch, _, _) = _sample(model, tok, 0.0)  # one fixed batch: only the scorer changes with the knob
    with torch.no_grad():
        _, train_all = score(model, batch, full=True)
    kls = []
    for knob in (0.03, 0.1, 0.3, 1.0):
        engine = InferenceEngine(model, knob)
        assert engine.model.dtype == torch.bfloat16  # the lower-precision rollout path is on
        _, infer_all = engine.score(batch, torch.Generator().manual_seed(1))
        kls.append(exact_kl(infer_all, train_all)[batch.response_mask].mean().item())
    assert kls[0] > 0.0
    assert all(a < b for a, b in itertools.pairwise(kls)), kls
    assert kls[-1] > 10 * kls[0], kls  # the knob moves the gap by orders of magnitude, not by noise


def test_router_noise_needs_a_moe_and_a_non_negative_knob(policy) -> None:
    model, _ = policy
    with pytest.raises(ValueError):
        InferenceEngine(model, -0.1)


def _three_steps(tmp_path: Path, method: str, knob: float) -> dict:
    cfg = GRPOConfig(mismatch=knob, **SMALL)
    return harness.run_one(method, 0, 3, cfg, tmp_path, use_wandb=False)


@pytest.mark.parametrize("method", METHODS)
def test_three_steps_of_each_method_write_every_metric_as_finite_numbers(tmp_path, policy, method) -> None:
    harness_out = _three_steps(tmp_path, method, 1.0)
    saved = json.loads(harness.run_file(tmp_path, method, 0).read_text())
    assert saved["metrics"] == harness_out["metrics"]
    assert set(saved["metrics"]) == set(METRICS)
    for key, values in saved["metrics"].items():
        assert len(values) == 3 and all(math.isfinite(v) for v in values), (key, values)
    m = saved["metrics"]
    assert all(v > 0 for v in m["kl_mean"]) and all(v > 0 for v in m["grad_norm"])
    if method in ("vanilla", "tis"):  # these never drop a token
        assert m["masked_frac"] == [0.0, 0.0, 0.0]
    if method == "icepop":  # the loss masks exactly the tokens the [0.5, 5] diagnostic counts (same tokens)
        assert m["masked_frac"] == pytest.approx(m["oob_frac"], rel=1e-9, abs=1e-12)
        assert sum(m["masked_frac"]) > 0  # knob 1.0 does push some tokens out of the band
    if method == "icepop:0.5:2":  # a narrower band masks at least what [0.5, 5] would
        assert all(a >= b for a, b in zip(m["masked_frac"], m["oob_frac"], strict=True))
        assert m["masked_entropy"][0] > 0


def test_at_knob_zero_icepop_tis_and_kpop_train_exactly_like_vanilla(tmp_path, policy) -> None:
    """k == 1 on every token, so every mismatch loss is verl's PPO-clip: identical trajectories, bit for bit."""
    runs = {m: _three_steps(tmp_path / m.replace(":", "_"), m, 0.0) for m in METHODS[:4]}
    ref = runs["vanilla"]["metrics"]
    assert ref["kl_mean"] == [0.0] * 3 and ref["oob_frac"] == [0.0] * 3
    for method, r in runs.items():
        assert r["metrics"]["grad_norm"] == ref["grad_norm"], method
        assert r["metrics"]["reward"] == ref["reward"], method
        assert r["metrics"]["masked_frac"] == [0.0] * 3, method


def test_bad_method_is_refused_before_any_run() -> None:
    with pytest.raises(ValueError, match="bad method"):
        harness.main(["--methods", "icepop:0.5", "--steps", "1", "--no-wandb"])

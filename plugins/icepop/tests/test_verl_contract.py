"""The mismatch losses through verl's own call site, registry and Hydra config (real verl, CPU)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from icepop_batches import actor_batch, compose_actor, compose_config

from ring_ext_icepop.loss import LOSSES, RolloutLogProbsMissing

TYPED = "actor_rollout_ref.actor.policy_loss._target_=ring_ext_icepop.config.MismatchPolicyLossConfig"


def _grad(ppo_loss, actor_cfg, log_prob, old, rollout, adv, mask):
    log_prob = log_prob.clone().requires_grad_(True)
    output, data = actor_batch(log_prob, old, rollout, adv, mask)
    loss, metrics = ppo_loss(actor_cfg, output, data)
    loss.backward()
    return loss.detach(), log_prob.grad, metrics


@pytest.mark.parametrize("kind", ["icepop", "kpop", "tis"])
def test_hydra_override_selects_the_loss_in_verls_registry(kind: str) -> None:
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    _, actor = compose_actor(f"actor_rollout_ref.actor.policy_loss.loss_mode={kind}")
    assert get_policy_loss_fn(actor.policy_loss.loss_mode) is LOSSES[kind]


def test_icepop_equals_vanilla_when_train_equals_infer(ppo_loss) -> None:
    torch.manual_seed(0)
    old = -torch.rand(4, 6) * 3
    log_prob = old + 0.3 * torch.randn(4, 6)  # the policy moved: PPO clipping is active
    adv = torch.randn(4, 6)
    mask = torch.rand(4, 6) > 0.2
    _, vanilla = compose_actor()
    _, icepop = compose_actor("actor_rollout_ref.actor.policy_loss.loss_mode=icepop")
    loss_v, grad_v, _ = _grad(ppo_loss, vanilla, log_prob, old, old, adv, mask)
    loss_i, grad_i, metrics = _grad(ppo_loss, icepop, log_prob, old, old, adv, mask)
    torch.testing.assert_close(loss_i, loss_v, rtol=0, atol=1e-7)
    torch.testing.assert_close(grad_i, grad_v, rtol=0, atol=1e-7)
    assert metrics["mismatch/kept_frac"].aggregate() == 1.0  # fraction of the response tokens


def test_icepop_gradient_is_zero_outside_the_band_and_k_times_ppo_inside(ppo_loss) -> None:
    alpha, beta = 0.5, 5.0
    ks = torch.tensor([[alpha, beta, 1.0, 2.0, alpha * 0.999, beta * 1.001, 0.1, 50.0]], dtype=torch.float64)
    old = torch.full_like(ks, -1.0)
    rollout = old - torch.log(ks)  # k = exp(old - rollout)
    # The edges exactly: old - rollout == log(alpha) and == log(beta) with no rounding in between.
    old[0, 0], rollout[0, 0] = math.log(alpha), 0.0
    old[0, 1], rollout[0, 1] = 0.0, -math.log(beta)
    log_prob = old + torch.linspace(-0.4, 0.4, ks.shape[1], dtype=torch.float64).unsqueeze(0)
    adv = torch.tensor([[1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0]], dtype=torch.float64)
    mask = torch.ones_like(ks, dtype=torch.bool)
    _, vanilla = compose_actor()
    _, icepop = compose_actor("actor_rollout_ref.actor.policy_loss.loss_mode=icepop")
    _, grad_v, _ = _grad(ppo_loss, vanilla, log_prob, old, rollout, adv, mask)
    _, grad_i, metrics = _grad(ppo_loss, icepop, log_prob, old, rollout, adv, mask)
    inside = torch.tensor([[True, True, True, True, False, False, False, False]])
    assert torch.equal(grad_i[~inside], torch.zeros(4, dtype=torch.float64))  # exactly zero
    torch.testing.assert_close(grad_i[inside], ks[inside] * grad_v[inside])
    assert metrics["mismatch/masked_below_frac"].aggregate() == pytest.approx(2 / 8)
    assert metrics["mismatch/masked_above_frac"].aggregate() == pytest.approx(2 / 8)


def test_masked_tokens_stay_in_the_token_mean_denominator(ppo_loss) -> None:
    """Masking a token removes its term, not its count: the loss does not jump with the mask."""
    old = torch.full((1, 4), -1.0, dtype=torch.float64)
    ks = torch.tensor([[1.0, 1.0, 1.0, 100.0]], dtype=torch.float64)
    adv = torch.ones_like(old)
    mask = torch.ones_like(old, dtype=torch.bool)
    _, icepop = compose_actor("actor_rollout_ref.actor.policy_loss.loss_mode=icepop")
    loss, _, _ = _grad(ppo_loss, icepop, old.clone(), old, old - torch.log(ks), adv, mask)
    assert loss.item() == pytest.approx(-3 / 4)  # three tokens at ratio 1, advantage 1, over 4 tokens


@pytest.mark.parametrize("kind", ["icepop", "kpop", "tis"])
def test_no_nan_from_extreme_or_non_finite_log_probs(ppo_loss, kind: str) -> None:
    old = torch.tensor([[-1.0, -1.0, -1.0, -float("inf"), -1.0, -2.0]])
    rollout = torch.tensor([[-1.0 - 1e4, -1.0 + 1e4, -float("inf"), -1.0, float("nan"), -2.0]])
    log_prob = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -1.0, -float("inf")]])
    adv = torch.ones(1, 6)
    mask = torch.tensor([[True, True, True, True, True, False]])  # last: padding holding -inf
    _, actor = compose_actor(f"actor_rollout_ref.actor.policy_loss.loss_mode={kind}")
    loss, grad, metrics = _grad(ppo_loss, actor, log_prob, old, rollout, adv, mask)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(math.isfinite(m.aggregate()) for m in metrics.values() if hasattr(m, "aggregate"))


@pytest.mark.parametrize("kind", ["icepop", "kpop", "tis"])
def test_all_masked_batch_gives_zero_loss_finite_grads_and_metrics(ppo_loss, kind: str) -> None:
    old = torch.full((2, 3), -1.0)
    rollout = old - 50.0  # k = e^50: every token rejected (tis: weight capped, but mask is empty)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    _, actor = compose_actor(f"actor_rollout_ref.actor.policy_loss.loss_mode={kind}")
    loss, grad, metrics = _grad(ppo_loss, actor, old.clone(), old, rollout, torch.ones(2, 3), mask)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros(2, 3))
    assert metrics["mismatch/kept_frac"].aggregate() == 0.0
    assert all(math.isfinite(m.aggregate()) for m in metrics.values() if hasattr(m, "aggregate"))


def test_missing_rollout_log_probs_stop_the_update_instead_of_falling_back(ppo_loss) -> None:
    old = torch.full((1, 3), -1.0)
    _, actor = compose_actor("actor_rollout_ref.actor.policy_loss.loss_mode=icepop")
    output, data = actor_batch(old.clone(), old, None, torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(RolloutLogProbsMissing, match="calculate_log_probs"):
        ppo_loss(actor, output, data)


def test_min_max_metrics_aggregate_as_min_max_across_micro_batches(ppo_loss) -> None:
    from verl.utils.metric.utils import Metric

    _, actor = compose_actor("actor_rollout_ref.actor.policy_loss.loss_mode=icepop")
    merged: dict[str, Metric] = {}
    for shift in (0.1, 0.7):
        old = torch.full((1, 2), -1.0)
        output, data = actor_batch(old.clone(), old, old - shift, torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool))
        _, metrics = ppo_loss(actor, output, data)
        for key, metric in metrics.items():
            merged.setdefault(key, metric.init_list()).extend(metric)
    assert merged["mismatch/log_ratio_max"].aggregate() == pytest.approx(0.7)
    assert merged["mismatch/log_ratio_min"].aggregate() == pytest.approx(0.1)


def test_typed_knobs_compose_and_bad_band_fails_at_start_naming_the_knob() -> None:
    from ring_ext.config_check import unknown_keys
    from ring_ext.startup import run_startup_checks

    knob = "+actor_rollout_ref.actor.policy_loss.icepop_beta=2.0"
    cfg, actor = compose_actor("actor_rollout_ref.actor.policy_loss.loss_mode=icepop", TYPED, knob)
    assert actor.policy_loss.icepop_beta == 2.0
    assert unknown_keys(cfg) == []
    run_startup_checks(cfg)  # a valid band passes
    bad_alpha = "+actor_rollout_ref.actor.policy_loss.icepop_alpha=3.0"  # alpha > beta
    bad = compose_config("actor_rollout_ref.actor.policy_loss.loss_mode=icepop", TYPED, bad_alpha, knob)
    with pytest.raises(ValueError, match="icepop_alpha"):
        run_startup_checks(bad)  # ring-ext's check in verl's validate_config, before Ray starts
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="icepop_alpha"):  # verl's dataclass conversion refuses it too
        compose_actor("actor_rollout_ref.actor.policy_loss.loss_mode=icepop", TYPED, bad_alpha, knob)


def test_untyped_knob_is_refused_naming_it() -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="icepop_beta"):
        compose_actor("actor_rollout_ref.actor.policy_loss.loss_mode=icepop",
                      "actor_rollout_ref.actor.policy_loss.icepop_beta=2")


def test_misspelled_loss_fails_at_start_listing_losses(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "verl.trainer.main_ppo", "+recipe=ring1t",
         "actor_rollout_ref.actor.policy_loss.loss_mode=icepopp"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "'icepopp' is not a registered policy loss" in proc.stderr
    for name in ("icepop", "kpop", "tis", "vanilla"):
        assert name in proc.stderr
    assert "ray init kwargs" not in proc.stdout


@pytest.mark.parametrize("nested", [False, True], ids=["padded", "nested"])
def test_tokens_of_two_policy_versions_in_one_micro_batch_are_masked_and_reported_by_lag(ppo_loss, nested) -> None:
    """A C3PO++ micro-batch: each row resumed under new weights, so its first tokens were decoded one version back
    (lag 1: far from the trainer's log-probs, k = 8) and its last ones by the current weights (lag 0, k = 1.2).
    IcePop [0.5, 5] rejects exactly the stale tokens: their gradient is 0, the others' is k x PPO's."""
    lag = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[True] * 6, [True] * 5 + [False]])
    ks = torch.where(lag == 1, 8.0, 1.2).double()
    old = torch.full((2, 6), -1.5, dtype=torch.float64)
    rollout = old - torch.log(ks)
    log_prob = old + 0.05
    adv = torch.tensor([[1.0], [-1.0]], dtype=torch.float64).expand(2, 6)
    _, vanilla = compose_actor()
    _, icepop = compose_actor("actor_rollout_ref.actor.policy_loss.loss_mode=icepop")
    _, grad_v, _ = _grad(ppo_loss, vanilla, log_prob, old, rollout, adv, mask)
    log_prob_i = log_prob.clone().requires_grad_(True)
    output, data = actor_batch(log_prob_i, old, rollout, adv, mask, lag=lag, nested=nested)
    loss, metrics = ppo_loss(icepop, output, data)
    loss.backward()
    stale = (lag == 1) & mask
    assert torch.equal(log_prob_i.grad[stale], torch.zeros(int(stale.sum()), dtype=torch.float64))
    fresh = (lag == 0) & mask
    torch.testing.assert_close(log_prob_i.grad[fresh], ks[fresh] * grad_v[fresh])
    value = {k: m.aggregate() for k, m in metrics.items() if k.startswith("mismatch/")}
    assert value["mismatch/kept_frac"] == pytest.approx(7 / 11)  # 4 stale of 11 response tokens rejected
    assert value["mismatch/lag1/kept_frac"] == 0.0 and value["mismatch/lag1/masked_above_frac"] == 1.0
    assert value["mismatch/lag0/kept_frac"] == 1.0 and value["mismatch/lag0/masked_below_frac"] == 0.0
    assert value["mismatch/lag1/k1"] == pytest.approx(-math.log(8.0))  # mean(infer - train) over stale tokens
    assert value["mismatch/lag0/k1"] == pytest.approx(-math.log(1.2))
    with pytest.raises(ValueError, match="per-token version lags"):
        output, data = actor_batch(log_prob.clone(), old, rollout, adv, mask, lag=lag[:, :5])
        ppo_loss(icepop, output, data)


def test_the_loss_reaches_verls_engine_workers_as_megatrons_engine_calls_it() -> None:
    """verl 0.9.1's engine workers (FSDP and Megatron alike) bind `ppo_loss` at import
    (`verl.workers.engine_workers`: `self.loss_fn = partial(ppo_loss, config=actor_config)`), and the Megatron
    engine calls it by keyword (`loss_function(model_output=..., data=..., dp_group=...)`, transformer_impl.py).
    The name the worker bound must be ring-ext's wrapper, and that call must give IcePop's masking. (megatron-core
    is not installed here: this is the call contract, not a Megatron run.)"""
    from functools import partial

    from verl.workers import engine_workers

    from ring_ext.patching import PATCHED

    assert getattr(engine_workers.ppo_loss, PATCHED, False)
    _, actor = compose_actor("actor_rollout_ref.actor.policy_loss.loss_mode=icepop")
    old = torch.full((1, 4), -1.0, dtype=torch.float64)
    rollout = old - torch.tensor([[0.0, 0.0, 3.0, -3.0]], dtype=torch.float64)  # k = 1, 1, e^3, e^-3
    output, data = actor_batch(old.clone().requires_grad_(True), old, rollout, torch.ones_like(old),
                               torch.ones_like(old, dtype=torch.bool))
    loss_function = partial(engine_workers.ppo_loss, config=actor)
    _, metrics = loss_function(model_output=output, data=data, dp_group=None)
    assert metrics["mismatch/kept_frac"].aggregate() == pytest.approx(0.5)
    assert metrics["mismatch/masked_above_frac"].aggregate() == pytest.approx(0.25)

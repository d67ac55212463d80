"""The sequence variants (seq_geo, seq_max and their compositions) against a plain-Python reference, at their edges,
with non-finite inputs, through verl's real loss call site, and equal to verl's own rollout correction."""

from __future__ import annotations

import math

import pytest
import torch
from icepop_batches import actor_batch, compose_actor

from ring_ext_icepop.loss import LOSSES
from ring_ext_icepop.metrics import mismatch_metrics
from ring_ext_icepop.variants import make_variant
from ring_ext_icepop.weights import mismatch_weights

F64 = torch.float64
INF, NAN = math.inf, math.nan
TYPED = "actor_rollout_ref.actor.policy_loss._target_=ring_ext_icepop.config.MismatchPolicyLossConfig"
# knobs under which a test batch has both kept and rejected responses (and, for the token band, tokens)
KNOBS = {
    "seq_geo": {"alpha": 0.9, "beta": 1.1},
    "seq_max": {"lo": 0.4, "hi": 2.5},
    "seq_max_icepop": {"lo": 0.4, "hi": 2.5, "alpha": 0.7, "beta": 1.5},
    "seq_geo_tis": {"alpha": 0.9, "beta": 1.1, "cap": 1.2},
}
SEQ_KINDS = tuple(KNOBS)


def reference(train: list[list[float]], infer: list[list[float]], mask: list[list[bool]], kind: str,
              knobs: dict[str, float]) -> tuple[list[list[float]], list[bool]]:
    """(weights, rejected responses), token by token in plain float64 Python, from each variant's docstring."""
    weights, rejected = [], []
    for row_t, row_i, row_m in zip(train, infer, mask):
        log_k = [t - i if m and math.isfinite(t - i) else None for t, i, m in zip(row_t, row_i, row_m)]
        valid = [x for x in log_k if x is not None]
        if kind in ("seq_geo", "seq_geo_tis"):
            mean = math.fsum(valid) / len(valid) if valid else 0.0
            out = bool(valid) and not math.log(knobs["alpha"]) <= mean <= math.log(knobs["beta"])
        else:
            lo, hi = (knobs["lo"], knobs["hi"])
            out = any(not math.log(lo) <= x <= math.log(hi) for x in valid)
        rejected.append(out)
        weights.append([0.0 if x is None or out else _token_weight(x, kind, knobs) for x in log_k])
    return weights, rejected


def _token_weight(log_k: float, kind: str, knobs: dict[str, float]) -> float:
    """M(k) of a valid token in a kept response."""
    if kind == "seq_geo":
        return 1.0
    if kind == "seq_geo_tis":
        return min(math.exp(log_k), knobs["cap"])
    if kind == "seq_max_icepop" and not math.log(knobs["alpha"]) <= log_k <= math.log(knobs["beta"]):
        return 0.0
    return math.exp(log_k)


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """64 responses of up to 40 tokens: per-response mismatch of varied size, one empty response, one with a nan
    and an -inf log-prob."""
    g = torch.Generator().manual_seed(seed)
    infer = -torch.rand(64, 40, generator=g, dtype=F64) * 5
    shift = (torch.rand(64, 1, generator=g, dtype=F64) - 0.5) * 0.4  # moves a response's geometric mean
    train = infer + shift + torch.randn(64, 40, generator=g, dtype=F64) * torch.rand(64, 1, generator=g) * 0.6
    mask = torch.arange(40)[None, :] < torch.randint(1, 41, (64, 1), generator=g)
    mask[3] = False
    train[5, 0], infer[5, 1] = NAN, -INF
    return train, infer, mask


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", SEQ_KINDS)
def test_weights_and_rejected_responses_equal_the_reference(kind: str, seed: int) -> None:
    train, infer, mask = _batch(seed)
    w = mismatch_weights(train, infer, mask, make_variant(kind, **KNOBS[kind]))
    weights, rejected = reference(train.tolist(), infer.tolist(), mask.tolist(), kind, KNOBS[kind])
    assert 5 < sum(rejected) < 59, "the batch must exercise both outcomes"
    assert w.seq_rejected.tolist() == rejected
    assert not rejected[3]  # the empty response is never rejected
    torch.testing.assert_close(w.weight, torch.tensor(weights, dtype=torch.float32), rtol=1e-6, atol=0)
    assert torch.equal(w.kept, torch.tensor(weights) > 0)  # every kept weight is positive here
    m = mismatch_metrics(w, mask, prefix="")
    assert m["seq_rejected_frac"] == pytest.approx(sum(rejected) / 63)  # over the 63 non-empty responses


def test_a_rejected_response_keeps_the_sides_of_its_tokens() -> None:
    """seq_max_icepop: a token the band rejects keeps its side; one only its response rejects goes by k < 1."""
    infer = torch.full((1, 4), -1.0, dtype=F64)
    train = infer + torch.tensor([[math.log(20.0), math.log(0.6), math.log(0.9), math.log(1.1)]], dtype=F64)
    w = mismatch_weights(train, infer, torch.ones(1, 4, dtype=torch.bool), make_variant("seq_max_icepop"))
    assert w.seq_rejected.tolist() == [True] and not w.kept.any()
    assert w.above[0].tolist() == [True, False, False, True] and w.below[0].tolist() == [False, True, True, False]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_seq_geo_edges_are_inclusive(dtype: torch.dtype) -> None:
    """Two tokens with the same log k: the mean is that log k exactly, on the float64 log of each edge; one ulp
    outside rejects the response."""
    alpha, beta = 0.5, 2.0
    lo, hi = torch.tensor(math.log(alpha), dtype=F64), torch.tensor(math.log(beta), dtype=F64)
    inf = torch.tensor(INF, dtype=F64)
    log_k = torch.stack([lo, hi, torch.nextafter(lo, -inf), torch.nextafter(hi, inf)])[:, None].expand(4, 2)
    log_k = log_k.to(dtype)  # float32: the edge as float32 holds it, then compared in float64
    w = mismatch_weights(log_k, torch.zeros_like(log_k), torch.ones(4, 2, dtype=torch.bool),
                         make_variant("seq_geo", alpha=alpha, beta=beta))
    expected = [float(x) < math.log(alpha) or float(x) > math.log(beta) for x in log_k[:, 0]]
    assert w.seq_rejected.tolist() == expected
    if dtype == F64:
        assert expected == [False, False, True, True]


def test_seq_geo_averages_over_valid_tokens_only() -> None:
    """Row 0: log k = 0.015 and a nan token; over the valid token alone the geometric mean 1.015 leaves [0.99, 1.01]
    (counting the nan token would halve it to inside). Row 1: padding's log k = 9 does not enter the mean."""
    train = torch.tensor([[0.015, NAN, 0.0], [0.0, 0.0, 9.0]], dtype=F64)
    mask = torch.tensor([[True, True, False], [True, True, False]])
    w = mismatch_weights(train, torch.zeros_like(train), mask, make_variant("seq_geo", alpha=0.99, beta=1.01))
    assert w.seq_rejected.tolist() == [True, False]
    assert w.kept.tolist() == [[False, False, False], [True, True, False]] and w.invalid[0, 1]


@pytest.mark.parametrize(("kind", "knobs", "words"), [
    ("seq_geo", {"alpha": 1.1, "beta": 1.0}, ["seq_geo needs alpha < beta", "seq_geo_alpha"]),
    ("seq_max", {"lo": 0.0}, ["seq_max_lo", "> 0"]),
    ("seq_max_icepop", {"lo": 0.6}, ["lo <= alpha and beta <= hi", "seq_max_icepop_lo"]),
    ("seq_max_icepop", {"hi": 4.0}, ["lo <= alpha and beta <= hi"]),
    ("seq_geo_tis", {"cap": -1.0}, ["seq_geo_tis_cap"]),
])
def test_bad_knobs_are_refused_naming_them(kind: str, knobs: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        make_variant(kind, **knobs)
    assert all(word in str(info.value) for word in words), str(info.value)


# --- through verl's loss call site -----------------------------------------------------------------------------


def _run(ppo_loss, actor, log_prob, old, rollout, adv, mask):
    log_prob = log_prob.clone().requires_grad_(True)
    output, data = actor_batch(log_prob, old, rollout, adv, mask)
    loss, metrics = ppo_loss(actor, output, data)
    loss.backward()
    return loss.detach(), log_prob.grad, {k: m.aggregate() for k, m in metrics.items() if hasattr(m, "aggregate")}


@pytest.mark.parametrize("kind", SEQ_KINDS)
def test_hydra_override_and_typed_knob_reach_verls_registry(kind: str) -> None:
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from ring_ext_icepop.config import variant_from_config

    knob, value = next(iter(KNOBS[kind].items()))
    _, actor = compose_actor(f"actor_rollout_ref.actor.policy_loss.loss_mode={kind}", TYPED,
                             f"+actor_rollout_ref.actor.policy_loss.{kind}_{knob}={value}")
    assert get_policy_loss_fn(actor.policy_loss.loss_mode) is LOSSES[kind]
    assert getattr(variant_from_config(kind, actor.policy_loss), knob) == value


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_a_rejected_response_stays_in_the_denominator(ppo_loss, agg: str) -> None:
    """Response 1 has one token at k = 20: seq_max rejects it whole, and every loss_agg_mode still divides by its
    tokens (token-mean) or counts it as a response (seq-mean-*), as a rejected token is counted."""
    old = torch.full((2, 4), -1.0, dtype=F64)
    ks = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 20.0, 1.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    _, actor = compose_actor("actor_rollout_ref.actor.policy_loss.loss_mode=seq_max",
                             f"actor_rollout_ref.actor.loss_agg_mode={agg}")
    loss, grad, metrics = _run(ppo_loss, actor, old, old, old - torch.log(ks), torch.ones_like(old), mask)
    # ratio 1, advantage 1: each kept token contributes -1; response 0 has 3 of them
    expected = {"token-mean": -3 / 7, "seq-mean-token-mean": -(3 / 3 + 0) / 2, "seq-mean-token-sum": -(3 + 0) / 2}
    assert loss.item() == pytest.approx(expected[agg])
    assert torch.equal(grad[1], torch.zeros(4, dtype=F64)) and (grad[0, :3] != 0).all()
    assert metrics["mismatch/seq_rejected_frac"] == 0.5 and metrics["mismatch/kept_frac"] == pytest.approx(3 / 7)


def test_seq_max_icepop_gradient_is_k_times_ppo_in_kept_responses_and_zero_elsewhere(ppo_loss) -> None:
    ks = torch.tensor([[1.2, 0.6, 3.0, 0.8], [1.2, 0.9, 1.1, 6.0], [0.15, 1.0, 1.0, 1.0]], dtype=F64)
    old = torch.full_like(ks, -1.5)
    log_prob = old + torch.linspace(-0.3, 0.3, 4, dtype=F64)
    adv = torch.tensor([[1.0], [-1.0], [2.0]], dtype=F64).expand(3, 4)
    mask = torch.ones_like(ks, dtype=torch.bool)
    _, vanilla = compose_actor()
    _, ours = compose_actor("actor_rollout_ref.actor.policy_loss.loss_mode=seq_max_icepop")  # [0.1, 10], [0.5, 5]
    _, grad_v, _ = _run(ppo_loss, vanilla, log_prob, old, old - torch.log(ks), adv, mask)
    _, grad, metrics = _run(ppo_loss, ours, log_prob, old, old - torch.log(ks), adv, mask)
    # k = 6 and 0.15: inside the response bound [0.1, 10], outside the band [0.5, 5]: only that token is rejected
    kept = torch.tensor([[True, True, True, True], [True, True, True, False], [False, True, True, True]])
    torch.testing.assert_close(grad[kept], ks[kept] * grad_v[kept])
    assert torch.equal(grad[~kept], torch.zeros(int((~kept).sum()), dtype=F64))
    assert metrics["mismatch/seq_rejected_frac"] == 0.0
    ks[2, 0] = 0.05  # below the response bound: the whole response goes
    _, grad, metrics = _run(ppo_loss, ours, log_prob, old, old - torch.log(ks), adv, mask)
    assert torch.equal(grad[2], torch.zeros(4, dtype=F64)) and metrics["mismatch/seq_rejected_frac"] == 1 / 3


@pytest.mark.parametrize("kind", SEQ_KINDS)
def test_no_nan_from_extreme_non_finite_or_empty(ppo_loss, kind: str) -> None:
    """Log-ratios of +-1e4, -inf and nan log-probs, an empty response, -inf on padding: finite loss, gradients and
    metrics; then an all-masked batch: zero loss and gradients."""
    old = torch.tensor([[-1.0, -1.0, -1.0, -INF, -1.0, -2.0], [-1.0] * 6, [-1.0] * 6])
    rollout = torch.tensor([[-1.0 - 1e4, -1.0 + 1e4, -INF, -1.0, NAN, -2.0], [-1.0] * 6, [-1.1] * 6])
    log_prob = torch.tensor([[-1.0] * 5 + [-INF], [-1.0] * 6, [-1.0] * 6])
    mask = torch.tensor([[True] * 5 + [False], [False] * 6, [True] * 6])  # row 1: an empty response
    _, actor = compose_actor(f"actor_rollout_ref.actor.policy_loss.loss_mode={kind}")
    loss, grad, metrics = _run(ppo_loss, actor, log_prob, old, rollout, torch.ones(3, 6), mask)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["mismatch/seq_rejected_frac"] in (0.0, 0.5)  # of the 2 non-empty responses
    empty = torch.zeros(2, 3, dtype=torch.bool)
    old = torch.full((2, 3), -1.0)
    loss, grad, metrics = _run(ppo_loss, actor, old, old, old - 50.0, torch.ones(2, 3), empty)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros(2, 3))
    assert metrics["mismatch/seq_rejected_frac"] == 0.0 and metrics["mismatch/kept_frac"] == 0.0


# --- equal to verl's rollout correction ---------------------------------------------------------------------


def test_equal_to_verls_rollout_correction_on_finite_log_ratios() -> None:
    """verl 0.9.1's rollout correction (its rejection zeroes response_mask; here its mask times its IS weights) on
    log-ratios within its +-20 clamp. verl's k1 is -log k: seq_geo(alpha, beta) is rollout_rs=seq_mean_k1 at
    "1/beta_1/alpha"; seq_max(1/c, c) rejects as rollout_rs=seq_max_k2 at (log c)^2 / 2."""
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask as verl_corr

    train, infer, mask = _batch(2)
    train, infer = torch.nan_to_num(train, nan=-1.0), torch.nan_to_num(infer, neginf=-1.0)
    geo = {"rollout_rs": "seq_mean_k1", "rollout_rs_threshold": f"{1 / 1.1}_{1 / 0.9}"}  # KNOBS' [0.9, 1.1]
    seq_max = {"rollout_rs": "seq_max_k2", "rollout_rs_threshold": math.log(2.5) ** 2 / 2}  # KNOBS: [0.4, 2.5]
    cases = {
        "icepop": ({"alpha": 0.7, "beta": 1.5}, {"rollout_is": "token", "rollout_is_threshold": "0.7_1.5"}),
        "tis": ({"cap": 1.2}, {"rollout_is": "token", "rollout_is_threshold": 1.2}),
        "seq_geo": (KNOBS["seq_geo"], geo),
        "seq_max": (KNOBS["seq_max"], {"rollout_is": "token", "rollout_is_threshold": "0.4_2.5", **seq_max}),
        "seq_max_icepop": (KNOBS["seq_max_icepop"],
                           {"rollout_is": "token", "rollout_is_threshold": "0.7_1.5", **seq_max}),
        "seq_geo_tis": (KNOBS["seq_geo_tis"], {"rollout_is": "token", "rollout_is_threshold": 1.2, **geo}),
    }
    for kind, (knobs, verl_args) in cases.items():
        ours = mismatch_weights(train, infer, mask, make_variant(kind, **knobs))
        is_weights, verl_mask, _ = verl_corr(train, infer, mask.double(), **verl_args)
        verl_w = verl_mask * (1.0 if is_weights is None else is_weights.batch["rollout_is_weights"])
        assert ours.seq_rejected is None or 0 < ours.seq_rejected.sum() < 60, kind
        torch.testing.assert_close(ours.weight.double(), verl_w, rtol=1e-6, atol=0, msg=kind)

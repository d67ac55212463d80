"""Unit tests of the token variants, their weights and metrics: band edges, K-Pop's binary KL, TIS, non-finite
inputs, metrics, knobs; and properties every variant (sequence ones too) keeps. Sequence variants:
test_sequence_variants.py."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ring_ext_icepop.metrics import mismatch_metrics
from ring_ext_icepop.variants import KPOP_MAX_LOG_WEIGHT, TIS, VARIANTS, IcePop, KPop, Variant, make_variant
from ring_ext_icepop.weights import MismatchWeights, mismatch_weights

MISMATCH_KINDS = tuple(VARIANTS)
TOKEN_KINDS = ("icepop", "kpop", "tis")

INF, NAN = float("inf"), float("nan")
F64 = torch.float64


def _t(rows: list[list[float]], dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


def _ones(x: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(x, dtype=torch.bool)


def _assert_partition(w: MismatchWeights, mask: torch.Tensor) -> None:
    """Every masked token is exactly one of kept/below/above/invalid; padding is none of them."""
    flags = torch.stack([w.kept, w.below, w.above, w.invalid]).int()
    assert torch.equal(flags.sum(0), mask.int())
    assert not (w.weight[~w.kept] != 0).any()
    assert torch.isfinite(w.weight).all() and (w.weight >= 0).all()
    assert torch.isfinite(w.log_ratio).all()
    assert not w.log_ratio[~(mask & ~w.invalid)].any()


def _assert_metrics_finite(metrics: dict[str, float]) -> None:
    assert metrics and all(type(v) is float and math.isfinite(v) for v in metrics.values()), metrics


# --- IcePop band ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("alpha", "beta"), [(0.5, 5.0), (0.8, 1.25), (0.1, 10.0)])  # float32 rounds them both ways
def test_icepop_band_edges_inclusive_and_next_float_rejected(dtype: torch.dtype, alpha: float, beta: float) -> None:
    lo = torch.tensor(math.log(alpha), dtype=dtype)
    hi = torch.tensor(math.log(beta), dtype=dtype)
    below_lo = torch.nextafter(lo, torch.tensor(-INF, dtype=dtype))
    above_hi = torch.nextafter(hi, torch.tensor(INF, dtype=dtype))
    zero = torch.zeros((), dtype=dtype)
    # token: (train, infer) with train - infer exactly lo, hi, one ulp outside each
    train = torch.stack([lo, zero, below_lo, zero])[None]
    infer = torch.stack([zero, -hi, zero, -above_hi])[None]
    assert (train - infer)[0].tolist() == [lo.item(), hi.item(), below_lo.item(), above_hi.item()]
    w = mismatch_weights(train, infer, _ones(train), IcePop(alpha=alpha, beta=beta))
    assert w.kept[0].tolist() == [True, True, False, False]
    assert w.below[0].tolist() == [False, False, True, False]
    assert w.above[0].tolist() == [False, False, False, True]
    assert w.weight[0, 2:4].tolist() == [0.0, 0.0]
    assert w.weight[0, :2].tolist() == pytest.approx([alpha, beta], rel=1e-6)


def test_icepop_edges_with_log_constructed_log_probs() -> None:
    """The usual way a test or a caller writes a k of exactly alpha or beta: train = infer + log(alpha)."""
    infer = _t([[-0.25, -0.1, 0.0, -0.5, -1.0, -2.5]])  # values where infer + log(k) rounds back exactly
    ks = [0.5, 0.5, 0.5, 5.0, 5.0, 5.0]
    train = infer + torch.tensor([[math.log(k) for k in ks]], dtype=F64)
    assert (train - infer).tolist()[0] == [math.log(k) for k in ks]  # premise: exact in float64
    w = mismatch_weights(train, infer, _ones(train), IcePop(alpha=0.5, beta=5.0))
    assert w.kept.all()
    assert w.weight[0].tolist() == pytest.approx(ks, rel=1e-12)


def test_icepop_weight_is_k_inside_and_zero_outside() -> None:
    g = torch.Generator().manual_seed(0)
    infer = -torch.rand(16, 64, generator=g, dtype=F64) * 10
    log_k = (torch.rand(16, 64, generator=g, dtype=F64) - 0.5) * 6  # k in [e^-3, e^3]
    train = infer + log_k
    alpha, beta = 0.5, 5.0
    w = mismatch_weights(train, infer, _ones(train), IcePop(alpha=alpha, beta=beta))
    k = torch.exp(train - infer)
    inside = (k >= alpha) & (k <= beta)
    assert 0 < inside.sum() < inside.numel()
    assert torch.equal(w.kept, inside)
    assert torch.equal(w.below, k < alpha) and torch.equal(w.above, k > beta)
    assert torch.allclose(w.weight.double(), torch.where(inside, k, 0.0), rtol=1e-6, atol=0)
    assert w.weight.dtype == torch.float32 and w.log_ratio.dtype == torch.float32


def test_bf16_inputs_match_their_float32_upcast_and_weights_are_detached() -> None:
    g = torch.Generator().manual_seed(1)
    train = (-torch.rand(4, 32, generator=g) * 5).to(torch.bfloat16).requires_grad_()
    infer = (-torch.rand(4, 32, generator=g) * 5).to(torch.bfloat16)
    mask = torch.rand(4, 32, generator=g) > 0.3
    for kind in MISMATCH_KINDS:
        cfg = make_variant(kind)
        a = mismatch_weights(train, infer, mask, cfg)
        b = mismatch_weights(train.detach().float(), infer.float(), mask.float(), cfg)  # 0/1 float mask too
        assert a.weight.dtype == torch.float32 and not a.weight.requires_grad
        assert torch.equal(a.weight, b.weight) and torch.equal(a.kept, b.kept)


# --- non-finite and extreme inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TOKEN_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_and_non_finite_log_probs(kind: str, dtype: torch.dtype) -> None:
    train = _t([[-1e4, 0.0, -1.0, -INF, NAN, -1.0, INF, -1.0, -1.0, NAN]], dtype)
    infer = _t([[0.0, -1e4, -1.0, -1.0, -1.0, -INF, -1.0, NAN, INF, NAN]], dtype)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)  # last: nan padding
    w = mismatch_weights(train, infer, mask, make_variant(kind))
    _assert_partition(w, mask)
    assert w.invalid[0].tolist() == [False] * 3 + [True] * 6 + [False]
    assert torch.equal(w.log_ratio[0, :3], (train.float() - infer.float())[0, :3])
    assert w.kept[0, 2] and w.weight[0, 2] == 1.0
    if kind == "tis":
        assert w.weight[0, :2].tolist() == [0.0, 2.0]  # min(k, cap): exp(-1e4) underflows to 0, exp(1e4) -> cap
    else:
        assert w.below[0, 0] and w.above[0, 1] and w.weight[0, :2].tolist() == [0.0, 0.0]
    metrics = mismatch_metrics(w, mask, entropy=torch.ones(1, 10), train_logp=train)
    _assert_metrics_finite(metrics)
    assert metrics["mismatch/invalid_frac"] == 6 / 9
    assert metrics["mismatch/log_ratio_min"] == pytest.approx(-1e4, rel=1e-2)
    # k3 clamps log k to [-20, 20]: valid log-ratios are -1e4, 1e4, 0
    expected_k3 = ((math.exp(-20) - 1 + 20) + (math.exp(20) - 1 - 20)) / 3
    assert metrics["mismatch/k3"] == pytest.approx(expected_k3, rel=1e-9)
    assert metrics["mismatch/k1"] == pytest.approx(-w.log_ratio[0, :3].double().mean().item(), rel=1e-9)


def test_naive_exp_then_mask_would_produce_nan() -> None:
    """The bug this module exists to avoid: exp of a rejected +1e4 log-ratio is inf, and inf * 0 is nan."""
    train, infer = _t([[0.0]], torch.float32), _t([[-1e4]], torch.float32)
    k = torch.exp(train - infer)
    assert torch.isnan(k * ((k >= 0.5) & (k <= 5.0)) * 0.0).all()  # the naive pattern, times a zero advantage
    w = mismatch_weights(train, infer, _ones(train), IcePop())
    assert w.weight.item() == 0.0 and (w.weight * 0.0).item() == 0.0 and w.above.item()


def test_all_masked_batch_metrics_are_zero() -> None:
    train, infer = _t([[NAN, -1.0], [-INF, 1e4]]), _t([[-1.0, INF], [0.0, 0.0]])
    mask = torch.zeros(2, 2, dtype=torch.bool)
    for kind in MISMATCH_KINDS:
        w = mismatch_weights(train, infer, mask, make_variant(kind))
        _assert_partition(w, mask)
        assert not (w.kept | w.below | w.above | w.invalid).any() and not w.weight.any()
        metrics = mismatch_metrics(w, mask, entropy=torch.ones(2, 2), train_logp=train, prefix="m/")
        keys = [*_METRIC_KEYS, *(["seq_rejected_frac"] if w.seq_rejected is not None else [])]
        assert set(metrics) == {f"m/{k}" for k in keys}
        assert all(v == 0.0 for v in metrics.values()), metrics


def test_all_rejected_batch_metrics() -> None:
    infer = _t([[-1.0, -2.0], [-3.0, -4.0]])
    train = infer + _t([[-3.0, -4.0], [5.0, 6.0]])  # k = e^-3, e^-4 (below), e^5, e^6 (above)
    mask = _ones(train)
    w = mismatch_weights(train, infer, mask, IcePop(alpha=0.5, beta=2.0))
    assert not w.kept.any() and not w.weight.any()
    m = mismatch_metrics(w, mask, entropy=_t([[1.0, 2.0], [3.0, 4.0]]), train_logp=train, prefix="")
    _assert_metrics_finite(m)
    assert m["kept_frac"] == 0.0 and m["ess"] == 0.0 and m["kept_entropy_mean"] == 0.0
    assert m["masked_below_frac"] == 0.5 and m["masked_above_frac"] == 0.5 and m["invalid_frac"] == 0.0
    assert m["masked_entropy_mean"] == 2.5
    assert m["masked_train_logp_mean"] == pytest.approx((-4 - 6 + 2 + 2) / 4)


# --- K-Pop ------------------------------------------------------------------------------------------------------


def _db(p: float, q: float) -> float:
    """Binary KL D_B(p||q) by hand, float64, with 0 * log(0 / x) = 0."""
    head = p * math.log(p / q) if p > 0 else 0.0
    if p == 1.0:
        return head
    return head + (1 - p) * math.log((1 - p) / (1 - q)) if q < 1.0 else INF


def _kpop(p: float, q: float, phi: float) -> MismatchWeights:
    lp, lq = (math.log(x) for x in (p, q))
    train, infer = _t([[lp]]), _t([[lq]])
    return mismatch_weights(train, infer, _ones(train), KPop(phi=phi))


@pytest.mark.parametrize(("p", "q"), [(0.3, 0.6), (0.6, 0.3), (0.9, 0.99), (0.02, 0.05), (0.999, 0.99), (0.5, 1e-3)])
def test_kpop_phi_exactly_at_the_binary_kl_keeps_slightly_below_rejects(p: float, q: float) -> None:
    d = max(_db(p, q), _db(q, p))
    at = _kpop(p, q, phi=d)
    assert at.kept.item() and at.weight.item() == pytest.approx(p / q, rel=1e-6)
    under = _kpop(p, q, phi=d * (1 - 1e-9))
    assert not under.kept.item() and under.weight.item() == 0.0
    assert under.below.item() == (p < q) and under.above.item() == (p > q)


@pytest.mark.parametrize(("p", "q"), [(0.9, 0.99), (0.99, 0.9)])
def test_kpop_rejects_when_only_one_direction_exceeds_phi(p: float, q: float) -> None:
    forward, backward = _db(p, q), _db(q, p)
    assert abs(forward - backward) > 0.05  # the two directions really differ here
    phi = (forward + backward) / 2  # one direction within, the other beyond
    w = _kpop(p, q, phi)
    assert not w.kept.item() and w.weight.item() == 0.0


@pytest.mark.parametrize("p", [1e-12, 0.2, 0.5, 0.97, 1.0])
def test_kpop_equal_probabilities_are_kept_with_weight_one(p: float) -> None:
    w = _kpop(p, p, phi=1e-9)
    assert w.kept.item() and w.weight.item() == 1.0


def test_kpop_probability_one_cases() -> None:
    # q == 1, p < 1: D_B(p||q) = +inf, rejected for any phi; k < 1 -> below
    w = _kpop(0.999, 1.0, phi=1e6)
    assert not w.kept.item() and w.below.item()
    # p == 1, q < 1: D_B(q||p) = +inf, rejected; k > 1 -> above
    w = _kpop(1.0, 0.999, phi=1e6)
    assert not w.kept.item() and w.above.item()
    # p == 1 in float32 noise above 0 counts as p == 1, q == 1: kept
    train, infer = _t([[1e-7]], torch.float32), _t([[0.0]], torch.float32)
    w = mismatch_weights(train, infer, _ones(train), KPop())
    assert w.kept.item()


@pytest.mark.parametrize(("eps_p", "eps_q"), [(1e-10, 4e-10), (3e-9, 1e-12)])
def test_kpop_near_probability_one_is_accurate(eps_p: float, eps_q: float) -> None:
    """p = 1 - eps_p, q = 1 - eps_q: log(1 - p) needs log1mexp, 1 - exp(log p) alone is off by ~1e-6 relative."""
    lp, lq = math.log1p(-eps_p), math.log1p(-eps_q)

    def db(l1: float, l2: float, e1: float, e2: float) -> float:  # D_B(1-e1 || 1-e2), all terms accurate
        return math.exp(l1) * (l1 - l2) + e1 * (math.log(e1) - math.log(e2))

    d = max(db(lp, lq, eps_p, eps_q), db(lq, lp, eps_q, eps_p))
    train, infer = _t([[lp]]), _t([[lq]])
    at = mismatch_weights(train, infer, _ones(train), KPop(phi=d))
    under = mismatch_weights(train, infer, _ones(train), KPop(phi=d * (1 - 1e-9)))
    assert at.kept.item() and not under.kept.item()


def test_kpop_kept_huge_ratio_is_capped_and_finite() -> None:
    # p = e^-12, q = e^-1e4: D_B(p||q) ~ p * 9988 ~ 0.06 <= phi, so the token is kept although k = e^9988
    train, infer = _t([[-12.0]]), _t([[-1e4]])
    p = math.exp(-12.0)
    assert p * (1e4 - 12.0) + (1 - p) * math.log(1 - p) < 0.5 and -math.log(1 - p) < 0.5  # both D_B, q = 0
    w = mismatch_weights(train, infer, _ones(train), KPop(phi=0.5))
    assert w.kept.item()
    assert w.weight.item() == pytest.approx(math.exp(KPOP_MAX_LOG_WEIGHT), rel=1e-6)


# --- TIS --------------------------------------------------------------------------------------------------------


def test_tis_weight_is_min_k_cap_and_nothing_rejected() -> None:
    g = torch.Generator().manual_seed(2)
    infer = -torch.rand(8, 64, generator=g, dtype=F64) * 10
    train = infer + (torch.rand(8, 64, generator=g, dtype=F64) - 0.5) * 8
    mask = torch.rand(8, 64, generator=g) > 0.2
    w = mismatch_weights(train, infer, mask, TIS(cap=2.0))
    k = torch.exp(train - infer)
    assert (k[mask] > 2.0).any() and (k[mask] < 2.0).any()
    assert torch.equal(w.kept, mask) and not w.below.any() and not w.above.any() and not w.invalid.any()
    assert torch.allclose(w.weight.double(), torch.where(mask, k.clamp(max=2.0), 0.0), rtol=1e-6, atol=0)
    assert w.weight[mask & (k >= 2.0)].eq(2.0).all()


# --- config -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"kind": "icepop", "alpha": -1.0}, ["alpha", "> 0", "-1.0"]),
        ({"kind": "icepop", "alpha": 0.0}, ["alpha"]),
        ({"kind": "icepop", "alpha": NAN}, ["alpha", "finite"]),
        ({"kind": "icepop", "beta": INF}, ["beta", "finite"]),
        ({"kind": "icepop", "beta": -2.0}, ["beta"]),
        ({"kind": "icepop", "alpha": 5.0, "beta": 2.0}, ["alpha < beta", "alpha=5.0", "beta=2.0"]),
        ({"kind": "icepop", "alpha": 2.0, "beta": 2.0}, ["alpha < beta"]),
        ({"kind": "icepop", "alpha": "0.5"}, ["alpha"]),
        ({"kind": "kpop", "phi": 0.0}, ["phi", "> 0"]),
        ({"kind": "kpop", "phi": NAN}, ["phi"]),
        ({"kind": "tis", "cap": -1.0}, ["cap", "> 0"]),
        ({"kind": "tis", "cap": INF}, ["cap", "finite"]),
        ({"kind": "ice-pop"}, ["kind", "'ice-pop'", "icepop", "kpop", "tis"]),
    ],
)
def test_config_rejects_bad_values_naming_the_knob(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        make_variant(**kwargs)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_a_variant_takes_only_its_own_knobs_and_is_frozen() -> None:
    with pytest.raises(ValueError, match=r"tis has no knob\(s\) \['alpha'\]; its knobs: \['cap'\]"):
        make_variant("tis", alpha=-1.0)  # alpha is irrelevant to tis
    cfg = TIS()
    with pytest.raises(AttributeError):
        cfg.cap = 3.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="shapes differ"):
        mismatch_weights(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 4), cfg)


# --- metrics ----------------------------------------------------------------------------------------------------

_METRIC_KEYS = (
    "k1 k3 masked_below_frac masked_above_frac invalid_frac kept_frac ess log_ratio_min log_ratio_max "
    "log_ratio_mean masked_entropy_mean kept_entropy_mean masked_train_logp_mean"
).split()


def _hand_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # k per token: row 0 = [1, 0.25, 4, 1.5], row 1 = [nan (invalid), pad, 0.5 (alpha edge), pad]
    infer = _t([[-1.0, -2.0, -3.0, -0.5], [-1.0, -7.0, 0.0, -9.0]])
    log_k = _t([[0.0, math.log(0.25), math.log(4.0), math.log(1.5)], [NAN, 0.0, math.log(0.5), 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)
    entropy = _t([[0.1, 0.2, 0.3, 0.4], [0.5, 9.0, 0.7, 9.0]])
    return infer + log_k, infer, mask, entropy


def test_metrics_match_hand_computation_icepop() -> None:
    train, infer, mask, entropy = _hand_batch()
    w = mismatch_weights(train, infer, mask, IcePop(alpha=0.5, beta=2.0))
    assert w.kept.tolist() == [[True, False, False, True], [False, False, True, False]]
    m = mismatch_metrics(w, mask, entropy=entropy, train_logp=train, prefix="")
    assert list(m) == _METRIC_KEYS
    ks = [1.0, 0.25, 4.0, 1.5, 0.5]  # valid tokens; weights 1, 0, 0, 1.5, 0.5
    expected = {
        "k1": -math.log(0.75) / 5,
        "k3": sum(k - 1 - math.log(k) for k in ks) / 5,
        "masked_below_frac": 1 / 6,
        "masked_above_frac": 1 / 6,
        "invalid_frac": 1 / 6,
        "kept_frac": 3 / 6,
        "ess": 3.0**2 / (5 * 3.5),
        "log_ratio_min": math.log(0.25),
        "log_ratio_max": math.log(4.0),
        "log_ratio_mean": math.log(0.75) / 5,
        "masked_entropy_mean": (0.2 + 0.3) / 2,
        "kept_entropy_mean": (0.1 + 0.4 + 0.7) / 3,
        "masked_train_logp_mean": ((-2.0 + math.log(0.25)) + (-3.0 + math.log(4.0))) / 2,
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key  # log_ratio is float32


def test_metrics_match_hand_computation_tis() -> None:
    train, infer, mask, entropy = _hand_batch()
    w = mismatch_weights(train, infer, mask, TIS(cap=2.0))
    m = mismatch_metrics(w, mask, entropy=entropy, prefix="tis/")
    weights = [1.0, 0.25, 2.0, 1.5, 0.5]
    assert m["tis/ess"] == pytest.approx(sum(weights) ** 2 / (5 * sum(x * x for x in weights)), rel=1e-6)
    assert m["tis/kept_frac"] == 5 / 6 and m["tis/masked_entropy_mean"] == 0.0
    assert "tis/masked_train_logp_mean" not in m


def test_metric_extrema_ignore_padding_and_non_finite_entropy_is_left_out() -> None:
    infer = _t([[-1.0, -1.0, -1.0, -1.0, -1.0]])
    train = infer + _t([[0.3, 0.5, 2.0, NAN, 9.0]])  # token 3 invalid, token 4 padding; log_ratio 0.0 there
    mask = torch.tensor([[True, True, True, True, False]])
    w = mismatch_weights(train, infer, mask, IcePop(alpha=0.5, beta=2.0))
    assert w.kept[0].tolist() == [True, True, False, False, False]
    entropy = _t([[NAN, 1.0, 3.0, 7.0, 7.0]])  # nan on a kept token is left out, not averaged in
    m = mismatch_metrics(w, mask, entropy=entropy, train_logp=train, prefix="")
    assert m["log_ratio_min"] == pytest.approx(0.3) and m["log_ratio_max"] == pytest.approx(2.0)
    assert m["kept_entropy_mean"] == 1.0 and m["masked_entropy_mean"] == 3.0
    assert m["masked_train_logp_mean"] == pytest.approx(1.0)


# --- property test ------------------------------------------------------------------------------------------------

_SPECIAL = st.sampled_from([NAN, INF, -INF, 1e4, -1e4, 0.0])
_LOGP = st.one_of(st.floats(-30.0, 0.0), st.floats(-30.0, 0.0), st.floats(-30.0, 0.0), _SPECIAL)


@st.composite
def _configs(draw: st.DrawFn) -> Variant:
    kind = draw(st.sampled_from(MISMATCH_KINDS))
    alpha = draw(st.floats(1e-3, 1.0))
    beta = alpha + draw(st.floats(1e-3, 10.0))
    lo, hi = alpha * draw(st.floats(1e-3, 1.0)), beta * draw(st.floats(1.0, 1e3))
    cap = draw(st.floats(1e-2, 10.0))
    knobs = {"icepop": {"alpha": alpha, "beta": beta},
             "kpop": {"phi": draw(st.floats(1e-4, 5.0)), "precision": draw(st.sampled_from(["float64", "float32"]))},
             "tis": {"cap": cap}, "seq_geo": {"alpha": alpha, "beta": beta}, "seq_max": {"lo": alpha, "hi": beta},
             "seq_max_icepop": {"lo": lo, "hi": hi, "alpha": alpha, "beta": beta},
             "seq_geo_tis": {"alpha": alpha, "beta": beta, "cap": cap}}[kind]
    return make_variant(kind, **knobs)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), cfg=_configs(), shape=st.tuples(st.integers(1, 4), st.integers(1, 8)))
def test_property_flags_partition_the_mask(data: st.DataObject, cfg: Variant, shape: tuple[int, int]) -> None:
    n = shape[0] * shape[1]
    train = torch.tensor(data.draw(st.lists(_LOGP, min_size=n, max_size=n)), dtype=torch.float32).view(shape)
    infer = torch.tensor(data.draw(st.lists(_LOGP, min_size=n, max_size=n)), dtype=torch.float32).view(shape)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n))).view(shape)
    w = mismatch_weights(train, infer, mask, cfg)
    _assert_partition(w, mask)
    finite = torch.isfinite(train) & torch.isfinite(infer)
    assert torch.equal(w.invalid, mask & ~finite)
    if cfg.name == "tis":
        assert torch.equal(w.kept, mask & finite)
    if cfg.name == "icepop":
        k = torch.exp(w.log_ratio.double())
        assert (k[w.kept] >= cfg.alpha * (1 - 1e-6)).all() and (k[w.kept] <= cfg.beta * (1 + 1e-6)).all()
    if w.seq_rejected is not None:  # a rejected response keeps no token; a response with none valid is never one
        assert not (w.kept & w.seq_rejected[:, None]).any()
        assert not (w.seq_rejected & ~(mask & finite).any(dim=-1)).any()
    _assert_metrics_finite(mismatch_metrics(w, mask, entropy=torch.rand(shape), train_logp=train))


def test_log_ratio_extrema_are_over_valid_tokens_when_all_share_a_sign() -> None:
    """Padding holds log_ratio 0.0: with every valid log-ratio > 0 (or < 0) the extrema must not be that 0.0."""
    for sign in (1.0, -1.0):
        infer = _t([[-1.0, -1.0, -1.0, -1.0]])
        train = infer + sign * _t([[0.5, 0.25, 0.0, 0.0]])
        mask = torch.tensor([[True, True, False, False]])
        m = mismatch_metrics(mismatch_weights(train, infer, mask, IcePop()), mask, prefix="")
        assert sorted([m["log_ratio_min"], m["log_ratio_max"]]) == sorted([sign * 0.25, sign * 0.5])


def test_k3_with_exp_matches_expm1_to_float64_rounding() -> None:
    g = torch.Generator().manual_seed(3)
    infer = -torch.rand(8, 512, generator=g, dtype=F64) * 4
    for scale in (1e-4, 1e-2, 1.0):
        train = infer + torch.randn(8, 512, generator=g, dtype=F64) * scale
        m = mismatch_metrics(mismatch_weights(train, infer, _ones(train), TIS(cap=1e9)), _ones(train), prefix="")
        r = (train - infer).float().double()  # the weights keep log k in float32
        exact = (torch.expm1(r) - r).mean().item()
        assert m["k3"] == pytest.approx(exact, rel=1e-6, abs=1e-15)


def test_kpop_float32_decides_as_float64_except_within_a_hair_of_phi() -> None:
    g = torch.Generator().manual_seed(4)
    infer = -torch.rand(16, 1024, generator=g) * 6
    train = infer + torch.randn(16, 1024, generator=g) * 0.5
    for phi in (0.02, 0.5):
        w64 = mismatch_weights(train, infer, _ones(train), KPop(phi=phi))
        w32 = mismatch_weights(train, infer, _ones(train), KPop(phi=phi, precision="float32"))
        differ = w64.kept != w32.kept
        assert 0 < w64.kept.sum() < w64.kept.numel()  # both decisions occur
        assert differ.float().mean() < 1e-3
        if differ.any():  # only tokens whose binary KL is within 1e-4 (relative) of phi
            from ring_ext_icepop.fastops import binary_kl_both

            fwd, bwd = binary_kl_both(train.double()[differ].clamp(max=0), infer.double()[differ].clamp(max=0))
            closest = torch.minimum((fwd - phi).abs(), (bwd - phi).abs())
            assert (closest <= 1e-4 * phi).all()

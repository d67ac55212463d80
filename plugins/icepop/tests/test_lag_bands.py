"""IcePop's band per policy-version lag (`icepop_lag_bands`, C3PO++ batches): per-token lookup, its knob, its
refusal without C3PO++, and the band each lag used in the diagnostics."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from icepop_batches import actor_batch, compose_actor, compose_config

from ring_ext_icepop.variants import IcePop, LagsMissing
from ring_ext_icepop.weights import mismatch_weights

F64 = torch.float64
ICEPOP = "actor_rollout_ref.actor.policy_loss.loss_mode=icepop"
BANDS = ("actor_rollout_ref.actor.policy_loss._target_=ring_ext_icepop.config.MismatchPolicyLossConfig",
         "+actor_rollout_ref.actor.policy_loss.icepop_lag_bands={0:[0.5,5.0],1:[0.3,8.0]}")


@pytest.mark.parametrize("nested", [False, True], ids=["padded", "nested"])
def test_tokens_of_two_lags_in_one_micro_batch_get_their_own_band(ppo_loss, nested: bool) -> None:
    """k = 6 and 0.4 lie outside lag 0's [0.5, 5] and inside lag 1's [0.3, 8]; lag 2 (past the last entry) takes
    lag 1's band, so its k = 7 is kept and its k = 9 rejected."""
    lag = torch.tensor([[1, 1, 1, 0, 0, 0], [2, 2, 0, 0, 0, 0]])
    ks = torch.tensor([[6.0, 0.4, 1.1, 6.0, 0.4, 1.1], [7.0, 9.0, 4.0, 1.0, 1.0, 1.0]], dtype=F64)
    mask = torch.tensor([[True] * 6, [True] * 5 + [False]])
    old = torch.full((2, 6), -1.5, dtype=F64)
    log_prob = old + 0.05
    adv = torch.tensor([[1.0], [-1.0]], dtype=F64).expand(2, 6)
    _, vanilla = compose_actor()
    _, icepop = compose_actor(ICEPOP, *BANDS)
    grads = []
    for actor, lags in ((vanilla, None), (icepop, lag)):
        x = log_prob.clone().requires_grad_(True)
        output, data = actor_batch(x, old, old - torch.log(ks), adv, mask, lag=lags,
                                   nested=nested and lags is not None)
        loss, metrics = ppo_loss(actor, output, data)
        loss.backward()
        grads.append(x.grad)
    kept = torch.tensor([[True, True, True, False, False, True], [True, False, True, True, True, False]])
    torch.testing.assert_close(grads[1][kept], ks[kept] * grads[0][kept])
    assert torch.equal(grads[1][~kept], torch.zeros(int((~kept).sum()), dtype=F64))
    value = {k: m.aggregate() for k, m in metrics.items() if k.startswith("mismatch/lag")}
    assert (value["mismatch/lag0/band_lo"], value["mismatch/lag0/band_hi"]) == (0.5, 5.0)
    assert (value["mismatch/lag1/band_lo"], value["mismatch/lag1/band_hi"]) == (0.3, 8.0)
    assert (value["mismatch/lag2/band_lo"], value["mismatch/lag2/band_hi"]) == (0.3, 8.0)
    assert value["mismatch/lag0/masked_above_frac"] == pytest.approx(1 / 6)  # k = 6 of lag 0's 6 tokens
    assert value["mismatch/lag2/kept_frac"] == 0.5 and value["mismatch/lag1/kept_frac"] == 1.0


def test_without_bands_the_lag_metrics_name_no_band(ppo_loss) -> None:
    old = torch.full((1, 2), -1.0)
    _, icepop = compose_actor(ICEPOP)
    output, data = actor_batch(old.clone(), old, old, torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool),
                               lag=torch.tensor([[0, 1]]))
    _, metrics = ppo_loss(icepop, output, data)
    assert "mismatch/lag1/kept_frac" in metrics and not any(k.endswith("band_lo") for k in metrics)


def test_a_gap_in_the_lags_takes_the_band_below_and_edges_round_as_the_scalar_band() -> None:
    """{0: .., 3: ..}: lags 1 and 2 use lag 0's band, 3 and above lag 3's. Per-token bands are the scalar band's
    logs rounded to the compute dtype, so each edge is kept and one ulp outside it is rejected, as IcePop's."""
    variant = IcePop(lag_bands={0: [0.5, 5.0], 3: [0.25, 10]})
    assert [variant.band(lag) for lag in range(5)] == [(0.5, 5.0)] * 3 + [(0.25, 10.0)] * 2
    for dtype in (torch.float32, F64):
        rows = []
        for lo, hi in ((0.5, 5.0), (0.25, 10.0)):
            lo_t, hi_t = torch.tensor(math.log(lo), dtype=dtype), torch.tensor(math.log(hi), dtype=dtype)
            inf = torch.tensor(math.inf, dtype=dtype)
            rows.append(torch.stack([lo_t, hi_t, torch.nextafter(lo_t, -inf), torch.nextafter(hi_t, inf)]))
        log_k = torch.stack(rows)  # row 0 with lag 2 (lag 0's band), row 1 with lag 7 (lag 3's band)
        w = mismatch_weights(log_k, torch.zeros_like(log_k), torch.ones(2, 4, dtype=torch.bool), variant,
                             lag=torch.tensor([[2] * 4, [7] * 4]))
        assert w.kept.tolist() == [[True, True, False, False]] * 2
        assert w.below[:, 2].all() and w.above[:, 3].all()


@pytest.mark.parametrize(("bands", "words"), [
    ({1: [0.5, 5.0]}, ["band for lag 0"]),
    ({0: [5.0, 0.5]}, ["icepop_lag_bands[0]", "0 < lo < hi"]),
    ({0: [0.5]}, ["[lo, hi]"]),
    ({0: [0.0, 5.0]}, ["0 < lo < hi"]),
    ({0: [0.5, math.inf]}, ["0 < lo < hi"]),
    ({-1: [0.5, 5.0], 0: [0.5, 5.0]}, ["integers >= 0", "-1"]),
    ({True: [0.5, 5.0]}, ["integers >= 0"]),
])
def test_bad_bands_are_refused_naming_the_knob(bands: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        IcePop(lag_bands=bands)
    assert "actor_rollout_ref.actor.policy_loss.icepop_lag_bands" in str(info.value)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_alpha_beta_that_the_bands_would_leave_unread_are_refused() -> None:
    with pytest.raises(ValueError, match="icepop_alpha/icepop_beta are not read"):
        IcePop(alpha=0.4, beta=5.0, lag_bands={0: [0.5, 5.0]})
    assert IcePop(alpha=0.4, beta=6.0, lag_bands={0: [0.4, 6]}).band(3) == (0.4, 6.0)  # the same band twice: fine


def test_a_batch_without_lags_stops_the_update(ppo_loss) -> None:
    old = torch.full((1, 2), -1.0)
    _, icepop = compose_actor(ICEPOP, *BANDS)
    output, data = actor_batch(old.clone(), old, old, torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(LagsMissing, match="trainer.v1.trainer_mode=c3po"):
        ppo_loss(icepop, output, data)


def test_bands_need_c3po_at_start_and_are_logged_with_it(caplog) -> None:
    from ring_ext.startup import run_startup_checks
    from ring_ext_icepop.plugin import check_mismatch_loss

    sync = compose_config(ICEPOP, *BANDS)  # ring1t_loop=grpo: trainer.v1.trainer_mode=sync
    with pytest.raises(ValueError, match=r"icepop_lag_bands .* trainer.v1.trainer_mode=sync has none"):
        run_startup_checks(sync)  # ring-ext's checks inside verl's validate_config, before Ray starts
    c3po = compose_config(ICEPOP, *BANDS, "trainer.v1.trainer_mode=c3po")
    with caplog.at_level(logging.WARNING, logger="ring_ext"):
        check_mismatch_loss(c3po)
    assert "icepop(alpha=0.5, beta=5.0, lag_bands={0: (0.5, 5.0), 1: (0.3, 8.0)})" in caplog.text

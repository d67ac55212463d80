"""Pool decisions and typed knobs of the c3po trainer mode (verl-free core)."""

from __future__ import annotations

import pytest

from ring_ext_c3po.pool import C3POModeConfig, top_up, training_batch


def test_budget_is_reached_at_phi_inclusive_and_the_whole_pool_is_trained_oldest_first() -> None:
    finished = [("b", 2, 30), ("a", 1, 40), ("c", 2, 29)]
    assert training_batch(finished, token_budget=100) is None  # 99 < 100
    assert training_batch(finished, token_budget=99) == ["a", "b", "c"]  # 99 >= 99: all of them, by dispatch step
    assert training_batch([], token_budget=1) is None


def test_top_up_refills_the_inference_pool_to_omega_and_never_below_zero() -> None:
    assert top_up(in_flight_groups=3, pool_prompts=8) == 5
    assert top_up(in_flight_groups=9, pool_prompts=8) == 0


def test_config_defaults_and_unknown_or_missing_keys() -> None:
    c = C3POModeConfig.from_mapping({"token_budget": 512})
    assert (c.max_retention, c.pool_prompts) == (1, 8)
    with pytest.raises(ValueError, match=r"unknown trainer.v1.c3po key\(s\) \['budget'\]"):
        C3POModeConfig.from_mapping({"token_budget": 1, "budget": 2})
    with pytest.raises(ValueError, match="token_budget .* is required"):
        C3POModeConfig.from_mapping({"pool_prompts": 4})


@pytest.mark.parametrize("bad", [{"token_budget": 0}, {"token_budget": 1.5}, {"token_budget": True},
                                 {"token_budget": 8, "max_retention": -1}, {"token_budget": 8, "pool_prompts": 0},
                                 {"token_budget": 8, "poll_interval_s": 0}])
def test_bad_values_are_refused_naming_the_key(bad: dict) -> None:
    with pytest.raises(ValueError, match="trainer.v1.c3po."):
        C3POModeConfig.from_mapping(bad)


def test_a_budget_the_pool_can_never_fill_is_refused() -> None:
    c = C3POModeConfig(token_budget=1025, pool_prompts=4)
    with pytest.raises(ValueError, match="4 x rollout.n 2 x max_response_length 128 = 1024"):
        c.check_reachable(group_size=2, max_response_length=128)
    C3POModeConfig(token_budget=1024, pool_prompts=4).check_reachable(2, 128)

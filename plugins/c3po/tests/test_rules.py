"""The C3PO++ rules held once (ring_ext_c3po.rules): knobs, top-up, resume budget, ageing, batch, mini-batches,
the group budget and the stall guard. Each test pins a number or a behaviour a wrong implementation would break."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ring_ext_c3po.rules import (
    C3POConfig,
    C3POStall,
    GroupBudget,
    StallGuard,
    after_cut,
    budget_reached,
    mini_batches,
    resume_budget,
    staleness,
    top_up,
    training_batch,
)


# -- C3POConfig ----------------------------------------------------------------------------------------------------
def test_config_defaults_and_describe() -> None:
    c = C3POConfig.from_mapping({"token_budget": 512})
    assert (c.token_budget, c.max_retention, c.pool_prompts) == (512, 1, 8)
    assert (c.poll_interval_s, c.stall_timeout_s, c.timeline) == (0.05, 600.0, True)
    assert c.describe() == "token_budget(Phi)=512 pool_prompts(Omega)=8 max_retention(sigma)=1 carry=abort"
    with pytest.raises(ValueError, match="carry"):
        C3POConfig.from_mapping({"token_budget": 4, "carry": "drop"})  # abort or keep only
    with pytest.raises(ValueError, match="admission"):
        C3POConfig.from_mapping({"token_budget": 4, "admission": "eager"})  # poll or completion only
    assert C3POConfig.from_mapping({"token_budget": 4, "admission": "completion"}).describe().endswith(
        "carry=abort admission=completion")
    assert C3POConfig.from_mapping({"token_budget": 4, "max_retention": 0, "pool_prompts": 1}).max_retention == 0


def test_config_refuses_unknown_and_missing_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown trainer.v1.c3po key\(s\) \['budget', 'pool_size'\]"):
        C3POConfig.from_mapping({"token_budget": 1, "budget": 2, "pool_size": 3})  # the old name is refused too
    for values in ({"pool_prompts": 4}, {"token_budget": None}):
        with pytest.raises(ValueError, match=r"token_budget \(Phi\) is required"):
            C3POConfig.from_mapping(values)


def test_config_from_verls_whole_config_reads_trainer_v1_c3po() -> None:
    def verl(v1: dict) -> SimpleNamespace:  # verl's DictConfig: attribute access, and .get on trainer.v1
        return SimpleNamespace(trainer=SimpleNamespace(v1=v1))

    c = C3POConfig.from_trainer_config(verl({"trainer_mode": "c3po", "c3po": {"token_budget": 96, "pool_prompts": 3}}))
    assert (c.token_budget, c.pool_prompts, c.max_retention) == (96, 3, 1)
    with pytest.raises(ValueError, match=r"needs trainer.v1.c3po.token_budget \(use \+recipe=ring1t"):
        C3POConfig.from_trainer_config(verl({"trainer_mode": "c3po"}))
    with pytest.raises(ValueError, match="unknown trainer.v1.c3po key"):
        C3POConfig.from_trainer_config(verl({"c3po": {"token_budget": 96, "pool_size": 3}}))


@pytest.mark.parametrize("key, bad", [("token_budget", 0), ("token_budget", 1.5), ("token_budget", True),
                                      ("token_budget", "8"), ("pool_prompts", 0), ("pool_prompts", True),
                                      ("max_retention", -1), ("max_retention", False), ("max_retention", 1.0)])
def test_config_refuses_bad_integers_naming_the_key(key: str, bad: object) -> None:
    with pytest.raises(ValueError, match=rf"trainer.v1.c3po.{key} must be an integer >= \d, got {bad!r}"):
        C3POConfig.from_mapping({"token_budget": 8, key: bad})


@pytest.mark.parametrize("key, bad", [("poll_interval_s", 0), ("poll_interval_s", -0.1), ("poll_interval_s", True),
                                      ("stall_timeout_s", 0.0), ("stall_timeout_s", -5), ("stall_timeout_s", "1")])
def test_config_refuses_non_positive_intervals(key: str, bad: object) -> None:
    with pytest.raises(ValueError, match=rf"trainer.v1.c3po.{key} must be a number > 0"):
        C3POConfig(token_budget=8, **{key: bad})


def test_check_reachable_refuses_a_budget_one_pool_cannot_hold() -> None:
    with pytest.raises(ValueError, match=r"token_budget=1025 exceeds what the pool can hold: pool_prompts 4 x "
                                         r"rollout.n 2 x max_response_length 128 = 1024"):
        C3POConfig(token_budget=1025, pool_prompts=4).check_reachable(group_size=2, max_response_length=128)
    C3POConfig(token_budget=1024, pool_prompts=4).check_reachable(2, 128)  # exactly a full pool: accepted


# -- budget, top-up, resume, ageing --------------------------------------------------------------------------------
def test_budget_reached_is_inclusive() -> None:
    assert (budget_reached(99, 100), budget_reached(100, 100), budget_reached(101, 100)) == (False, True, True)


def test_top_up_refills_to_omega_and_admits_nothing_once_reached_or_drained() -> None:
    assert top_up(3, 8, reached=False) == 5
    assert top_up(0, 8, reached=False) == 8
    assert top_up(9, 8, reached=False) == 0  # over Omega (a restart's restored groups): never negative
    assert top_up(3, 8, reached=True) == 0  # the phase's budget is met: no new prompts until the next phase
    assert top_up(3, 8, reached=False, prompts_left=False) == 0


def test_resume_budget_is_what_is_left_and_refuses_impossible_counts() -> None:
    assert (resume_budget(10, 0), resume_budget(10, 4), resume_budget(10, 10)) == (10, 6, 0)
    for held in (-1, 11):
        with pytest.raises(ValueError, match=f"{held} tokens held outside"):
            resume_budget(10, held)


def test_after_cut_ages_only_requests_holding_tokens_and_purges_above_sigma() -> None:
    assert after_cut(0, 0, max_retention=0) == (0, False)  # cut while queued: nothing stale, no ageing even at sigma 0
    assert after_cut(1, 0, max_retention=1) == (1, False)
    assert after_cut(0, 5, max_retention=1) == (1, False)  # retention == sigma: kept
    assert after_cut(1, 5, max_retention=1) == (2, True)  # sigma + 1: purged
    assert after_cut(0, 1, max_retention=0) == (1, True)  # sigma 0: the first carry holding a token purges
    assert after_cut(2, 3, max_retention=5) == (3, False)


# -- batch, mini-batches -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("oldest", "policy", "sigma", "rule"), [
    (4, 4, 1, "any"),  # fresh: may wait a step (lag 1 then)
    (3, 4, 1, "now"),  # lag 1 now, 2 if deferred: this step or never
    (2, 4, 1, "purge"),  # lag 2 already
    (4, 4, 0, "now"),  # sigma 0: nothing may wait
    (3, 4, 0, "purge"),
    (2, 4, 2, "now"),
    (1, 4, 2, "purge"),
])
def test_staleness_says_which_groups_may_wait_a_step_and_which_lag_past_sigma_already(
        oldest: int, policy: int, sigma: int, rule: str) -> None:
    assert staleness(oldest, policy, sigma) == rule


def test_training_batch_is_none_below_phi_then_the_groups_up_to_the_crossing_in_completion_order() -> None:
    finished = [("b", 2.0, 30), ("a", 1.0, 40), ("c", 3.0, 29)]  # (uid, completion order, tokens)
    assert training_batch(finished, token_budget=100) is None  # 99 < 100
    assert training_batch(finished, token_budget=99) == ["a", "b", "c"]  # 99 >= 99: the crossing group included
    assert training_batch(finished, token_budget=70) == ["a", "b"]  # "c" finished after the crossing: next step
    assert training_batch(finished, token_budget=1) == ["a"]
    assert training_batch([("z", 0, 5), ("y", 3, 5), ("x", 0, 5)], 10) == ["x", "z"]  # ties: by uid
    assert training_batch([], token_budget=1) is None
    # groups left over by the last cut are all trained, first, whatever their completion order; then the prefix
    assert training_batch([("n1", 5, 10), ("c", 9, 5), ("n2", 6, 10)], 12, carried={"c"}) == ["c", "n1"]
    assert training_batch([("a", 1, 40), ("b", 2, 30), ("c", 3, 29)], 10, carried={"b", "c"}) == ["b", "c"]
    assert training_batch([("c", 3, 4), ("n", 1, 4)], 10, carried={"c"}) is None  # 8 < 10: keep decoding


@pytest.mark.parametrize("groups, per_mini_batch, steps", [(7, 2, 1), (8, 2, 4), (6, 4, 1), (12, 5, 2), (9, 3, 3),
                                                            (3, 8, 1), (1, 1, 1), (10, 1, 10)])
def test_mini_batches_hold_whole_groups_and_divide_the_batch(groups: int, per_mini_batch: int, steps: int) -> None:
    assert mini_batches(groups, per_mini_batch) == steps
    assert groups % steps == 0


@pytest.mark.parametrize("groups, per_mini_batch", [(0, 2), (4, 0), (-1, 1)])
def test_mini_batches_refuse_empty_inputs(groups: int, per_mini_batch: int) -> None:
    with pytest.raises(ValueError, match="groups >= 1 and mini_batch_groups >= 1"):
        mini_batches(groups, per_mini_batch)


# -- GroupBudget ---------------------------------------------------------------------------------------------------
def test_a_group_counts_only_when_its_last_sample_finishes() -> None:
    b = GroupBudget(group_size=3, token_budget=100)
    assert not b.finish("a", 40) and not b.finish("a", 30)
    assert b.tokens == 0  # 2 of 3 samples: C unchanged
    assert not b.finish("a", 5)
    assert b.tokens == 75 and not b.reached


def test_the_crossing_fires_exactly_once_at_the_completion_that_reaches_phi() -> None:
    b = GroupBudget(group_size=2, token_budget=10)
    fired = [b.finish(g, n) for g, n in [("a", 4), ("b", 3), ("a", 4), ("b", 2), ("c", 9), ("c", 9)]]
    assert fired == [False, False, False, True, False, False]  # a: 8 < 10; b completes: 13 >= 10; c after: no
    assert b.tokens == 31 and b.reached  # groups finishing after the crossing still count (overshoot)


def test_purge_drops_a_partial_group_and_its_finished_samples() -> None:
    b = GroupBudget(group_size=2, token_budget=10)
    b.finish("a", 7)
    b.purge("a")
    assert not b.finish("a", 8)  # a fresh group under the same key: 1 of 2 samples, the purged 7 is gone
    assert b.tokens == 0
    assert b.finish("a", 2) and b.tokens == 10  # 8 + 2, not 7 + 8
    b.purge("never-seen")  # purging an unknown group is a no-op


def test_reset_starts_a_phase_keeping_partial_groups_and_rearming_the_crossing() -> None:
    b = GroupBudget(group_size=2, token_budget=5)
    assert not b.finish("a", 3)
    assert not b.finish("b", 1)
    assert b.finish("b", 4)  # C = 5: crossing
    b.reset()
    assert (b.tokens, b.reached) == (0, False)
    assert b.finish("a", 6)  # a's first sample (3) was kept: 3 + 6 = 9 counts in the phase that completes it
    assert b.tokens == 9


def test_a_resumed_runs_restored_tokens_count_first_and_move_the_crossing() -> None:
    """The finished groups a checkpoint brought back count on top of what the phase counted already (a re-issued
    request may finish before they are read): the crossing is the completion that reaches Phi with them, as in the
    process that deferred them; restored past Phi, no completion crosses (the trainer's poll cuts)."""
    b = GroupBudget(group_size=1, token_budget=10)
    assert not b.finish("reissued", 3)
    b.restore(6)
    assert (b.tokens, b.reached) == (9, False)
    assert b.finish("next", 1) and b.tokens == 10  # without the 6 restored tokens C would be 4: no crossing
    full = GroupBudget(group_size=1, token_budget=10)
    full.restore(12)
    assert full.reached and not full.finish("any", 1)
    full.reset()
    assert full.finish("any", 10)  # the next phase crosses again


def test_a_group_already_lagging_past_sigma_is_not_counted_at_its_completion() -> None:
    """The gate's half of `staleness`: a group whose oldest token lags more than sigma behind the engine's version
    at its last completion never counts towards Phi (the trainer purges it), so it cannot end a phase."""
    b = GroupBudget(group_size=2, token_budget=10, max_retention=1)
    b.finish("stale", 6, (1, 3))  # decoded by version 1 and finished while the engine holds version 3
    assert not b.finish("stale", 6, (3, 3)) and b.tokens == 0
    b.finish("fresh", 6, (2, 3))  # lag 1: within sigma
    assert b.finish("fresh", 6, (3, 3)) and b.tokens == 12
    plain = GroupBudget(group_size=1, token_budget=5)  # without sigma (the reference scheduler): versions unread
    assert plain.finish("g", 6, (0, 9)) and plain.tokens == 6


def test_a_key_seen_twice_in_flight_counts_as_two_groups() -> None:
    b = GroupBudget(group_size=2, token_budget=100)
    for n in (1, 2, 3, 4):
        b.finish("same-prompt", n)
    assert b.tokens == 10


@pytest.mark.parametrize("group_size, phi", [(0, 1), (1, 0)])
def test_group_budget_refuses_empty_bounds(group_size: int, phi: int) -> None:
    with pytest.raises(ValueError, match="group_size >= 1 and token_budget >= 1"):
        GroupBudget(group_size, phi)


# -- StallGuard ----------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_stall_guard_raises_after_the_timeout_without_progress_naming_budget_pool_and_counts() -> None:
    clock, config = Clock(), C3POConfig(token_budget=64, pool_prompts=4, stall_timeout_s=30)
    guard = StallGuard(config.stall_timeout_s, clock)
    guard.check(progress=0, in_flight=3, tokens=10, config=config, finished=1)
    clock.now += 29
    guard.check(progress=0, in_flight=3, tokens=10, config=config, finished=1)
    clock.now += 20  # 49 s since progress 0 was first seen, but progress moved: the timer restarts
    guard.check(progress=1, in_flight=3, tokens=20, config=config, finished=2)
    clock.now += 30
    guard.check(progress=1, in_flight=3, tokens=20, config=config, finished=2)  # exactly the timeout: not yet
    clock.now += 1
    with pytest.raises(C3POStall, match=r"no request finished for 31 s \(trainer.v1.c3po.stall_timeout_s=30\); "
                                        r"budget 20/64 tokens \(Phi\), pool 3/4 groups in flight \(Omega\), "
                                        r"2 finished groups"):
        guard.check(progress=1, in_flight=3, tokens=20, config=config, finished=2)


def test_stall_guard_raises_at_once_when_nothing_is_in_flight_and_the_budget_is_unmet() -> None:
    clock, config = Clock(), C3POConfig(token_budget=64, pool_prompts=4)
    guard = StallGuard(config.stall_timeout_s, clock)
    with pytest.raises(C3POStall, match=r"nothing pending or running and the budget unmet; budget 63/64 tokens "
                                        r"\(Phi\), pool 0/4 groups in flight \(Omega\), 5 finished groups"):
        guard.check(progress=0, in_flight=0, tokens=63, config=config, finished=5)
    guard.check(progress=1, in_flight=0, tokens=64, config=config, finished=6)  # budget met: the batch is ready
    assert issubclass(C3POStall, RuntimeError)

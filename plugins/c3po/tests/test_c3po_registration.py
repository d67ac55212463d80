"""The c3po mode reaches verl's trainer registry through the plugin, and refuses bad knobs before Ray work."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf


def test_verl_finds_the_c3po_trainer_mode() -> None:
    import verl  # noqa: F401  (entry points: the plugin registers lazily)
    from ring_ext_c3po.trainer import C3POTrainer
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.trainer.ppo.v1.trainer_colocate_async import PPOTrainerColocateAsync

    cls = get_trainer_cls("c3po")
    assert cls is C3POTrainer and issubclass(cls, PPOTrainerColocateAsync)


def test_mode_config_is_read_from_the_verl_config_and_refuses_a_missing_section() -> None:
    from ring_ext_c3po.rules import C3POConfig

    mode_config = C3POConfig.from_trainer_config
    section = {"token_budget": 96, "pool_prompts": 3}
    cfg = OmegaConf.create({"trainer": {"v1": {"trainer_mode": "c3po", "c3po": section}}})
    c = mode_config(cfg)
    assert (c.token_budget, c.pool_prompts, c.max_retention) == (96, 3, 1)
    with pytest.raises(ValueError, match=r"\+trainer.v1.c3po.token_budget"):
        mode_config(OmegaConf.create({"trainer": {"v1": {"trainer_mode": "c3po"}}}))


def _compose(*overrides: str):
    from ring_ext.verl_config import compose_verl

    return compose_verl(["+recipe=ring1t", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["~trainer.v1.c3po.token_budget"], r"trainer.v1.c3po.token_budget \(Phi\) is required"),
    (["trainer.v1.c3po.token_budget=1025", "trainer.v1.c3po.pool_prompts=8"],
     r"token_budget=1025 exceeds what the pool can hold: pool_prompts 8 x rollout.n 2 x max_response_length 64 = 1024"),
    (["trainer.v1.c3po.pool_prompts=0"], r"trainer.v1.c3po.pool_prompts must be an integer >= 1, got 0"),
    (["trainer.v1.c3po.max_retention=-1"], r"max_retention must be an integer >= 0"),
    (["+trainer.v1.c3po.stall_timeout_s=0"], r"stall_timeout_s must be a number > 0"),
    (["trainer.nnodes=2", "trainer.default_local_dir=checkpoints/x"],
     r"relative path each node resolves on its own disk; give an absolute path"),
])
def test_bad_c3po_settings_are_refused_in_the_driver_before_ray(overrides: list[str], message: str) -> None:
    """verl's main_ppo runs the startup checks inside validate_config, before ray.init: nothing has started."""
    import verl  # noqa: F401  (loads the plugins and their startup checks)

    from ring_ext.startup import run_startup_checks

    with pytest.raises(ValueError, match=message):
        run_startup_checks(_compose(*overrides))


def test_the_loop_logs_each_technique_and_its_knobs_at_start(caplog: pytest.LogCaptureFixture) -> None:
    import verl  # noqa: F401

    from ring_ext.startup import run_startup_checks

    with caplog.at_level("WARNING", logger="ring_ext"):
        run_startup_checks(_compose())
    text = caplog.text
    assert "C3PO++ partial rollouts on: token_budget(Phi)=256 pool_prompts(Omega)=24 max_retention(sigma)=1" in text
    assert "policy loss icepop(alpha=0.5, beta=5.0)" in text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ring_ext"):
        run_startup_checks(_compose("ring1t_loop=grpo"))
    assert "C3PO++ partial rollouts on" not in caplog.text and "actor policy loss = vanilla" in caplog.text
    assert "trainer.v1.c3po is set but trainer.v1.trainer_mode=sync" in caplog.text  # a knob doing nothing is said


def test_a_fixed_micro_batch_count_is_refused_for_the_variable_c3po_batch() -> None:
    import verl  # noqa: F401

    from ring_ext.startup import run_startup_checks

    with pytest.raises(ValueError, match="set actor_rollout_ref.actor.use_dynamic_bsz=true"):
        run_startup_checks(_compose("actor_rollout_ref.actor.use_dynamic_bsz=false"))


def test_a_purged_sample_is_not_scored_and_the_others_are() -> None:
    """Through verl's own AgentLoopWorker (patched by the plugin on import): the reward worker is never asked for a
    sample the client purged; any other sample goes to verl's scoring as before."""
    import asyncio

    import verl  # noqa: F401  (loads the plugin, which patches the agent loop on import)
    from verl.experimental.agent_loop.agent_loop import AgentLoopOutput, AgentLoopWorker

    def output(purged: bool) -> AgentLoopOutput:
        return AgentLoopOutput(prompt_ids=[1, 2], response_ids=[3], response_mask=[1], num_turns=2,
                               metrics={}, extra_fields={"c3po_purged": purged})

    class NoRewardWorker:  # verl's scoring asks for these; a purged sample must not reach them
        @property
        def reward_loop_worker_handles(self):
            raise AssertionError("the reward workers were asked to score a purged sample")

    purged = output(True)
    asyncio.run(AgentLoopWorker._compute_score(NoRewardWorker(), [purged], kwargs={}))
    assert purged.reward_score == 0.0 and purged.extra_fields["reward_extra_info"] == {}
    kept = output(False)
    with pytest.raises(AssertionError, match="asked to score"):  # verl's own path runs for the others
        asyncio.run(AgentLoopWorker._compute_score(NoRewardWorker(), [kept], kwargs={}))

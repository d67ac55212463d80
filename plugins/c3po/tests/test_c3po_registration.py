"""The c3po mode reaches verl's trainer registry through the plugin, and refuses bad knobs before Ray work."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf


def test_verl_finds_the_c3po_trainer_mode() -> None:
    import verl  # noqa: F401  (entry points: the plugin registers lazily)
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.trainer.ppo.v1.trainer_colocate_async import PPOTrainerColocateAsync

    from ring_ext_c3po.verl_mode import C3POTrainer

    cls = get_trainer_cls("c3po")
    assert cls is C3POTrainer and issubclass(cls, PPOTrainerColocateAsync)


def test_mode_config_is_read_from_the_verl_config_and_refuses_a_missing_section() -> None:
    from ring_ext_c3po.verl_mode import mode_config

    cfg = OmegaConf.create({"trainer": {"v1": {"trainer_mode": "c3po", "c3po": {"token_budget": 96, "pool_prompts": 3}}}})
    c = mode_config(cfg)
    assert (c.token_budget, c.pool_prompts, c.max_retention) == (96, 3, 1)
    with pytest.raises(ValueError, match=r"\+trainer.v1.c3po.token_budget"):
        mode_config(OmegaConf.create({"trainer": {"v1": {"trainer_mode": "c3po"}}}))

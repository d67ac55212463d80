"""verl 0.9.1's own Hydra config, composed the way its entry points compose it.

One place for the path of verl's config directory and for composing `ppo_trainer` (or another verl
config) with overrides such as `+recipe=ring1t`: used by the config-key check, tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig


def verl_config_dir() -> Path:
    import verl

    return Path(verl.__file__).parent / "trainer" / "config"


def compose_verl(
    overrides: Sequence[str] = (), *, config_name: str = "ppo_trainer", return_hydra_config: bool = False
) -> DictConfig:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(verl_config_dir()), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)

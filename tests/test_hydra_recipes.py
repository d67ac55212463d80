"""`+recipe=...` composes with verl's real `ppo_trainer` config through ring-ext's search-path plugin."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from ring_ext.config_check import UnknownConfigKeyError, check_config_keys, unknown_keys
from ring_ext.recipes import list_recipes
from ring_ext.verl_config import compose_verl


def compose_ppo(*overrides: str):
    return compose_verl(overrides)


def test_ring1t_composes_with_verl_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RING_EXT_CACHE", str(tmp_path))
    cfg = compose_ppo("+recipe=ring1t")
    assert cfg.algorithm.adv_estimator == "grpo"
    assert cfg.actor_rollout_ref.rollout.name == "vllm"
    assert cfg.actor_rollout_ref.actor.strategy == "fsdp2"
    # verl's own keys the recipe does not touch keep verl's defaults
    assert cfg.actor_rollout_ref.actor.clip_ratio == 0.2
    assert cfg.data.train_files.endswith("tiny-v3/data/arith_train.parquet")
    assert Path(cfg.actor_rollout_ref.model.path, "config.json").is_file()


def test_accel_resolver_picks_cpu_values_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from ring_ext.device import training_device

    cfg = compose_ppo("+recipe=ring1t")
    for device, sleep_mode, gpus in (("cpu", False, 1), ("cuda", True, None)):
        training_device.cache_clear()
        monkeypatch.setenv("RING_EXT_DEVICE", device)
        rollout = cfg.actor_rollout_ref.rollout
        assert rollout.enable_sleep_mode is sleep_mode
        assert cfg.ray_kwargs.ray_init.num_gpus == gpus
    training_device.cache_clear()


@pytest.mark.parametrize("recipe", ["ring1t", "ring1t_rlvr", "ring1t_rlhf"])
def test_weight_sync_engine_follows_the_trainer_mode(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Colocated modes (rlvr's c3po included) keep verl's naive sync; separate_async gets astate, as verl needs."""
    backend = lambda *o: compose_ppo(f"+recipe={recipe}", *o).actor_rollout_ref.rollout.checkpoint_engine.backend
    assert backend() == "naive"
    assert backend("trainer.v1.trainer_mode=separate_async") == "astate"
    assert backend("trainer.v1.trainer_mode=separate_async",
                   "actor_rollout_ref.rollout.checkpoint_engine.backend=nccl") == "nccl"  # the user's choice wins
    monkeypatch.setitem(sys.modules, "ring_ext_astate", None)  # as if ring-ext-astate were not installed
    assert backend() == "naive"
    with pytest.raises(InterpolationResolutionError,
                       match="pip install ring-ext-astate, or set actor_rollout_ref.rollout.checkpoint_eng"):
        backend("trainer.v1.trainer_mode=separate_async")


def test_recipe_passes_verl_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same checks `python -m verl.trainer.main_ppo` runs before starting Ray."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    monkeypatch.setenv("RING_EXT_DEVICE", "cpu")
    cfg = compose_ppo("+recipe=ring1t")
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))


def test_unknown_recipe_lists_available_ones() -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_ppo("+recipe=does_not_exist")
    message = str(err.value)
    assert "recipe/does_not_exist" in message
    for recipe in list_recipes():
        assert recipe.name in message


def test_misspelled_knob_fails_naming_it() -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_ppo("+recipe=ring1t", "actor_rollout_ref.actor.ppo_mini_bach_size=2")
    assert "ppo_mini_bach_size" in str(err.value)


TYPO_RECIPE = """# @package _global_
hydra:
  callbacks:
    ring_ext_key_check:
      _target_: ring_ext.config_check.KeyCheckCallback
actor_rollout_ref:
  actor:
    clip_ratoi: 0.3
"""


def test_misspelled_knob_inside_a_recipe_file_is_named(tmp_path: Path) -> None:
    """Hydra lets a config file add keys; ring-ext's check refuses the ones verl would never read."""
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "typo.yaml").write_text(TYPO_RECIPE)
    cfg = compose_ppo("+recipe=typo", f"hydra.searchpath=[file://{tmp_path}]")
    assert unknown_keys(cfg) == ["actor_rollout_ref.actor.clip_ratoi"]
    with pytest.raises(UnknownConfigKeyError,
                       match=r"actor_rollout_ref.actor.clip_ratoi.*did you mean 'actor_rollout_ref.actor.clip_ratio'"):
        check_config_keys(cfg)


def test_misspelled_recipe_knob_stops_main_ppo_before_ray_starts(tmp_path: Path) -> None:
    """A typo in an untyped section, which verl's own dataclass checks would never see."""
    (tmp_path / "recipe").mkdir()
    typo = TYPO_RECIPE.replace("actor_rollout_ref:\n  actor:\n    clip_ratoi: 0.3",
                               "trainer:\n  total_traning_steps: 2")
    (tmp_path / "recipe" / "typo.yaml").write_text(typo)
    proc = subprocess.run(
        [sys.executable, "-m", "verl.trainer.main_ppo", "+recipe=typo", f"hydra.searchpath=[file://{tmp_path}]"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "trainer.total_traning_steps  (did you mean 'trainer.total_training_steps'?)" in proc.stderr
    assert "Callback KeyCheckCallback" not in proc.stderr  # raised as an error, not a Hydra warning
    assert "ray init kwargs" not in proc.stdout


def test_ring1t_adds_only_keys_verl_accepts() -> None:
    cfg = compose_ppo("+recipe=ring1t")
    assert unknown_keys(cfg) == []


def test_list_recipes_reads_installed_package() -> None:
    names = [r.name for r in list_recipes()]
    assert "ring1t" in names
    assert all(r.summary for r in list_recipes())


def test_resolved_recipe_has_no_dangling_interpolation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RING_EXT_CACHE", str(tmp_path))
    cfg = compose_ppo("+recipe=ring1t")
    OmegaConf.resolve(cfg)  # raises on an unknown resolver or a missing key
    assert cfg.reward.custom_reward_function.path.endswith("ring_ext/tiny/reward.py")


def test_loss_of_a_missing_plugin_fails_at_start_with_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if ring-ext-icepop were not installed: its losses are absent from verl's registry."""
    from verl.trainer.ppo import core_algos

    from ring_ext.startup import check_policy_loss_registered

    for name in ("icepop", "kpop", "tis"):
        monkeypatch.delitem(core_algos.POLICY_LOSS_REGISTRY, name, raising=False)
    cfg = compose_ppo("+recipe=ring1t", "actor_rollout_ref.actor.policy_loss.loss_mode=kpop")
    with pytest.raises(ValueError, match=r"'kpop' comes with the plugin ring-ext-icepop: pip install ring-ext-icepop"):
        check_policy_loss_registered(cfg)


def test_a_plugin_config_section_accepts_its_dataclass_fields_and_names_a_typo() -> None:
    """ring-ext-c3po declares `trainer.v1.c3po` typed by its C3POConfig (Registrar.config_section)."""
    import verl  # noqa: F401  (loads the plugins, which declare their sections)

    good = compose_ppo("+recipe=ring1t", "trainer.v1.c3po.token_budget=64", "trainer.v1.c3po.max_retention=2",
                       "+trainer.v1.c3po.stall_timeout_s=30")
    assert unknown_keys(good) == []
    typo = compose_ppo("+recipe=ring1t", "trainer.v1.c3po.token_budget=64", "+trainer.v1.c3po.max_retentoin=2")
    assert unknown_keys(typo) == ["trainer.v1.c3po.max_retentoin"]


def test_trainer_mode_of_a_missing_plugin_fails_at_start_with_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if ring-ext-c3po were not installed: its module cannot be found."""
    import importlib.util

    from ring_ext import startup

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ring_ext_c3po" else real_find_spec(name, *a))
    cfg = compose_ppo("+recipe=ring1t", "trainer.v1.trainer_mode=c3po")
    with pytest.raises(ValueError, match=r"'c3po' comes with the plugin ring-ext-c3po, which is not installed: "
                                         r"pip install ring-ext-c3po"):
        startup.check_trainer_mode_plugin(cfg)
    # verl's own modes need no plugin
    startup.check_trainer_mode_plugin(compose_ppo("+recipe=ring1t", "ring1t_loop=grpo"))


def test_the_ring1t_loop_without_its_plugins_stops_before_ray_naming_the_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`+recipe=ring1t` runs IcePop + C3PO++: each missing plugin is named by the driver's startup checks."""
    import importlib.util

    import verl  # noqa: F401  (loads the plugins and the startup checks)
    from verl.trainer.ppo import core_algos

    from ring_ext.startup import run_startup_checks

    loop = compose_ppo("+recipe=ring1t")
    real_find_spec = importlib.util.find_spec
    with monkeypatch.context() as m:
        m.setattr(importlib.util, "find_spec",
                  lambda name, *a: None if name == "ring_ext_c3po" else real_find_spec(name, *a))
        with pytest.raises(ValueError, match="'c3po' comes with the plugin ring-ext-c3po.*pip install ring-ext-c3po"):
            run_startup_checks(loop)
    for name in ("icepop", "kpop", "tis"):
        monkeypatch.delitem(core_algos.POLICY_LOSS_REGISTRY, name, raising=False)
    with pytest.raises(ValueError, match="'icepop' comes with the plugin ring-ext-icepop: pip install ring-ext-icepop"):
        run_startup_checks(loop)


@pytest.mark.parametrize("recipe", ["ring1t", "ring1t_rlvr"])  # rlvr and rlhf share ring1t_profile/tiny_ppo
def test_num_cpus_applies_only_when_ray_starts_locally(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ray.init` refuses num_cpus when it attaches to a running cluster (two hosts: tests in
    plugins/astate/tests/test_two_hosts.py): the tiny recipes' num_cpus is null exactly then."""
    from omegaconf import open_dict
    from ray._private import services

    # no cluster found on this machine unless a case says so (a `ray start` leaves its address in a file)
    bootstrap: list[str | None] = [None]
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: bootstrap[0])
    monkeypatch.setattr(services, "find_gcs_addresses", list)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_init = compose_ppo(f"+recipe={recipe}").ray_kwargs.ray_init  # resolved at each read, as by ray.init

    def num_cpus(address: str | None = None) -> object:
        with open_dict(ray_init):
            ray_init.address = address
        return ray_init.num_cpus

    assert num_cpus() == 8  # ray.init starts Ray itself
    assert num_cpus("127.0.0.2:6379") is None
    assert num_cpus("local") == 8
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.2:6379")
    assert num_cpus() is None
    assert num_cpus("local") == 8  # "local" starts a new instance whatever the environment says
    monkeypatch.delenv("RAY_ADDRESS")
    bootstrap[0] = "127.0.0.2:6379"  # `ray start --head` ran here: a bare ray.init attaches to it
    assert num_cpus() is None
    assert num_cpus("local") == 8
    # the key composes from the command line, and a user's own value is kept
    cfg = compose_ppo(f"+recipe={recipe}", "+ray_kwargs.ray_init.address=local",
                      "ray_kwargs.ray_init.num_cpus=4")
    assert cfg.ray_kwargs.ray_init.num_cpus == 4 and unknown_keys(cfg) == []


def test_ray_starts_locally_follows_ray_init(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same decision as ray.init's `canonicalize_bootstrap_address` (None: start a local instance)."""
    from ray._private import services

    from ring_ext.resolvers import ray_starts_locally

    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    monkeypatch.setattr(services, "find_gcs_addresses", list)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for address in (None, "local", "127.0.0.2:6379", "auto"):
        try:
            expected = services.canonicalize_bootstrap_address(address) is None
        except ConnectionError:  # "auto" with no cluster: ray.init fails too, it does not start one
            expected = False
        assert ray_starts_locally(address) is expected, address
    assert ray_starts_locally(None) and not ray_starts_locally("auto")
    assert not ray_starts_locally("10.0.0.1:6379")


def test_keys_anywhere_below_ray_init_are_free_form() -> None:
    """ray.init's kwargs are Ray's, not verl's: runtime_env.env_vars is how variables reach an existing cluster."""
    cfg = compose_ppo("+recipe=ring1t", "+ray_kwargs.ray_init.runtime_env.env_vars.MY_VAR=1")
    assert unknown_keys(cfg) == []
    assert unknown_keys(compose_ppo("+recipe=ring1t", "+actor_rollout_ref.actor.clip_ratoi=0.3")) == [
        "actor_rollout_ref.actor.clip_ratoi"]

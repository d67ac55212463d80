"""Ring-1T stage recipes (ring1t_rlvr, ring1t_rlhf, ring1t_sft), each with a tiny and a paper profile; compose-only.

EXPECTED is the one source of truth for the documented values: the table test composes each recipe x profile
with verl's real config and compares, and a second test checks docs/recipes.md shows the same table.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from ring_ext.config_check import unknown_keys
from ring_ext.verl_config import compose_verl

DOCS = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"

# recipe -> (verl config it composes with, profile group)
RECIPES = {
    "ring1t_rlvr": ("ppo_trainer", "ring1t_profile/rlvr"),
    "ring1t_rlhf": ("ppo_trainer", "ring1t_profile/rlhf"),
    "ring1t_sft": ("sft_trainer_engine", "ring1t_profile/sft"),
}
PROFILES = ("tiny", "paper")

A = "actor_rollout_ref.actor"
PPO_COMMON = {
    "algorithm.adv_estimator": "grpo",
    "algorithm.use_kl_in_reward": False,
    f"{A}.use_kl_loss": False,
    "actor_rollout_ref.rollout.temperature": 1.0,
    f"{A}.optim.betas": [0.9, 0.999],
    f"{A}.optim.weight_decay": 0.01,
}
TINY_PPO = {
    f"{A}.optim.lr": 1e-4,
    "data.train_batch_size": 4,
    "actor_rollout_ref.rollout.n": 2,
    "data.max_response_length": 64,
}
ICEPOP = {
    f"{A}.policy_loss.loss_mode": "icepop",
    f"{A}.policy_loss.icepop_alpha": 0.5,
    f"{A}.policy_loss.icepop_beta": 5.0,
}
C3PO = {"trainer.v1.trainer_mode": "c3po", "trainer.v1.c3po.max_retention": 1}
RM = {"reward.reward_model.enable": True, "reward.reward_model.rollout.name": "vllm"}
VANILLA = {f"{A}.policy_loss.loss_mode": "vanilla"}
SFT_COMMON = {"optim.lr_scheduler_type": "cosine", "optim.weight_decay": 0.1, "trainer.total_epochs": 3}
SFT_PAPER = {"optim.lr": 2e-4, "optim.lr_warmup_steps": 30, "trainer.total_training_steps": None}
SFT_TINY = {"optim.lr": 3e-3, "optim.lr_warmup_steps": 4, "trainer.total_training_steps": 128}

EXPECTED: dict[tuple[str, str], dict[str, Any]] = {
    ("ring1t_rlvr", "tiny"): {
        **PPO_COMMON,
        **TINY_PPO,
        **ICEPOP,
        **C3PO,
        "trainer.v1.c3po.token_budget": 512,
        "trainer.v1.c3po.pool_prompts": 8,
    },
    ("ring1t_rlvr", "paper"): {
        **PPO_COMMON,
        f"{A}.optim.lr": 2e-6,
        "data.train_batch_size": 480,
        "actor_rollout_ref.rollout.n": 8,
        "data.max_response_length": 65536,
        **ICEPOP,
        **C3PO,
        "trainer.v1.c3po.token_budget": 62914560,
        "trainer.v1.c3po.pool_prompts": 960,
    },
    ("ring1t_rlhf", "tiny"): {**PPO_COMMON, **TINY_PPO, **VANILLA, **RM, "reward.custom_reward_function.path": None},
    ("ring1t_rlhf", "paper"): {
        **PPO_COMMON,
        f"{A}.optim.lr": 3e-6,
        "data.train_batch_size": 80,
        "actor_rollout_ref.rollout.n": 8,
        "data.max_response_length": 32768,
        **VANILLA,
        **RM,
    },
    ("ring1t_sft", "tiny"): {**SFT_COMMON, **SFT_TINY, "data.max_length": 256},
    ("ring1t_sft", "paper"): {**SFT_COMMON, **SFT_PAPER, "data.max_length": 65536},
}
CASES = sorted(EXPECTED)


def profile_override(recipe: str, profile: str) -> list[str]:
    """The whole profile switch: no override for the default (tiny), exactly one for the paper profile."""
    return [] if profile == "tiny" else [f"{RECIPES[recipe][1]}={profile}"]


def compose_recipe(recipe: str, profile: str, *extra: str):
    return compose_verl(
        [f"+recipe={recipe}", *profile_override(recipe, profile), *extra], config_name=RECIPES[recipe][0]
    )


def compose_base(config_name: str):
    return compose_verl(config_name=config_name)


def fmt(value: Any) -> str:
    """How docs/recipes.md writes a value."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value != 0 and (abs(value) < 1e-3):
        return f"{value:.0e}".replace("e-0", "e-")
    return str(value)


@pytest.mark.parametrize(("recipe", "profile"), CASES)
def test_documented_values(recipe: str, profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RING_EXT_DEVICE", "cpu")
    cfg = compose_recipe(recipe, profile)
    for key, expected in EXPECTED[(recipe, profile)].items():
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        assert value == expected, f"{recipe} [{profile}] {key}: {value!r} != {expected!r}"


@pytest.mark.parametrize(("recipe", "profile"), CASES)
def test_adds_only_keys_verl_reads(recipe: str, profile: str) -> None:
    cfg = compose_recipe(recipe, profile)
    config_name = RECIPES[recipe][0]
    # ppo recipes: against verl's generated ppo default (what KeyCheckCallback uses); sft: against sft_trainer_engine
    base = None if config_name == "ppo_trainer" else compose_base(config_name)
    assert unknown_keys(cfg, base=base) == []


@pytest.mark.parametrize("recipe", ["ring1t_rlvr", "ring1t_rlhf"])
def test_ppo_recipes_install_the_key_check(recipe: str) -> None:
    cfg = compose_verl([f"+recipe={recipe}"], return_hydra_config=True)
    assert cfg.hydra.callbacks.ring_ext_key_check._target_ == "ring_ext.config_check.KeyCheckCallback"


def _validate(cfg) -> None:
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))


@pytest.mark.parametrize("recipe", ["ring1t_rlvr", "ring1t_rlhf"])
def test_tiny_profile_passes_verl_validation(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RING_EXT_DEVICE", "cpu")
    _validate(compose_recipe(recipe, "tiny"))


def test_rlvr_paper_profile_passes_verl_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RING_EXT_DEVICE", "cuda")
    _validate(compose_recipe("ring1t_rlvr", "paper"))


def test_rlhf_paper_profile_needs_the_reward_model_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RING_EXT_DEVICE", "cuda")
    monkeypatch.delenv("RING1T_REWARD_MODEL_PATH", raising=False)
    cfg = compose_recipe("ring1t_rlhf", "paper")
    # ring-ext's startup check (inside verl's validate_config, before Ray) resolves the config and names the key
    from ring_ext.startup import run_startup_checks

    with pytest.raises(ValueError, match=r"RING1T_REWARD_MODEL_PATH(.|\n)*full_key: reward\.reward_model\.model_path"):
        run_startup_checks(cfg)
    # given on the command line (or via the environment) it composes, resolves and validates
    cfg = compose_recipe("ring1t_rlhf", "paper", "reward.reward_model.model_path=/models/rm")
    assert OmegaConf.to_container(cfg, resolve=True)["reward"]["reward_model"]["model_path"] == "/models/rm"
    _validate(cfg)
    monkeypatch.setenv("RING1T_REWARD_MODEL_PATH", "/models/rm-env")
    assert compose_recipe("ring1t_rlhf", "paper").reward.reward_model.model_path == "/models/rm-env"


def test_sft_paper_profile_needs_its_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RING1T_SFT_TRAIN_FILES", raising=False)
    cfg = compose_recipe("ring1t_sft", "paper")
    with pytest.raises(Exception, match=r"full_key: data\.train_files"):
        OmegaConf.to_container(cfg, resolve=True)
    cfg = compose_recipe("ring1t_sft", "paper", "data.train_files=/data/sft.parquet")
    assert cfg.data.train_files == "/data/sft.parquet"


def test_sft_tiny_profile_trains_on_the_embedded_long_cot_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.parquet as pq

    monkeypatch.setenv("RING_EXT_CACHE", str(tmp_path))
    cfg = OmegaConf.to_container(compose_recipe("ring1t_sft", "tiny"), resolve=True)
    rows = pq.read_table(cfg["data"]["train_files"]).to_pylist()
    assert len(rows) == 256 and cfg["model"]["path"].startswith(str(tmp_path))
    # every answer is a worked chain that ends in the `#### n` line the RL reward checks, and n is right
    from ring_ext.tiny.reward import compute_score

    for row in rows:
        user, answer = (m["content"] for m in row["messages"])
        assert answer.startswith("Let's think step by step.") and "\nCheck: " in answer
        expression = answer.split("\n")[1].rstrip(".").split(" = ")[0]
        truth = eval(expression)  # noqa: S307 -- "a op b" written by our own generator
        assert compute_score("ring_ext/arith", answer, str(truth))["acc"] == 1.0, (user, answer)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_switching_profile_is_exactly_one_override(recipe: str) -> None:
    override = profile_override(recipe, "paper")
    assert len(override) == 1
    tiny, paper = compose_recipe(recipe, "tiny"), compose_recipe(recipe, "paper")
    # naming the default explicitly gives the same config as no override
    assert OmegaConf.to_container(
        compose_recipe(recipe, "tiny", f"{RECIPES[recipe][1]}=tiny")
    ) == OmegaConf.to_container(tiny)
    assert tiny.trainer.experiment_name == f"{recipe}_tiny"
    assert paper.trainer.experiment_name == f"{recipe}_paper"


def _docs_tables() -> dict[str, dict[str, list[str]]]:
    """docs/recipes.md: per `### <recipe>` section, a table `| key | tiny | paper |`."""
    tables: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in DOCS.read_text().splitlines():
        heading = re.match(r"^### `?(\w+)`?", line)
        if heading:
            section = heading.group(1)
            tables[section] = {}
        row = re.match(r"^\| `([\w.]+)` \|(.*)\|\s*$", line)
        if section and row:
            tables[section][row.group(1)] = [cell.strip().strip("`") for cell in row.group(2).split("|")]
    return tables


def test_docs_show_the_tested_table() -> None:
    tables = _docs_tables()
    for (recipe, profile), values in EXPECTED.items():
        table = tables.get(recipe)
        assert table is not None, f"docs/recipes.md has no section ### {recipe}"
        column = PROFILES.index(profile)
        for key, value in values.items():
            assert key in table, f"docs/recipes.md ### {recipe}: no row for `{key}`"
            assert table[key][column] == fmt(value), (
                f"docs/recipes.md ### {recipe} `{key}` [{profile}]: {table[key][column]!r} != {fmt(value)!r}"
            )


def test_docs_name_the_one_override() -> None:
    text = DOCS.read_text()
    for recipe, (_, group) in RECIPES.items():
        assert f"+recipe={recipe} {group}=paper" in text


@pytest.mark.parametrize("profile", PROFILES)
def test_rlvr_c3po_knobs_are_valid_and_reachable(profile: str) -> None:
    from ring_ext_c3po.rules import C3POConfig

    cfg = compose_recipe("ring1t_rlvr", profile)
    knobs = C3POConfig.from_mapping(OmegaConf.to_container(cfg.trainer.v1.c3po))
    knobs.check_reachable(cfg.actor_rollout_ref.rollout.n, cfg.data.max_response_length)
    # the budget is at most one full-length synchronous batch: C3PO++ steps never wait longer than sync ones
    rollout_tokens = cfg.data.train_batch_size * cfg.actor_rollout_ref.rollout.n * cfg.data.max_response_length
    assert knobs.token_budget <= rollout_tokens

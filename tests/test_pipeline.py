"""`ring-ext pipeline`: hand-over overrides composed with verl's real configs, state file, errors (no training here;
the whole pipeline runs in tests/test_pipeline_e2e.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ring_ext import known_plugins
from ring_ext.cli import main as cli_main
from ring_ext.config_check import unknown_keys
from ring_ext.pipeline import (
    PIPELINES,
    PipelineError,
    PipelineState,
    Stage,
    StageResult,
    check_plugins,
    run_pipeline,
    stage_model,
    stage_overrides,
    summary_table,
    total_steps,
)
from ring_ext.verl_config import compose_verl

SFT, RLVR, RLHF = PIPELINES["ring1t"]


def test_ring1t_runs_sft_then_rlvr_then_rlhf() -> None:
    assert [(s.name, s.recipe) for s in PIPELINES["ring1t"]] == [
        ("sft", "ring1t_sft"), ("rlvr", "ring1t_rlvr"), ("rlhf", "ring1t_rlhf")
    ]  # fmt: skip
    assert SFT.is_sft and not RLVR.is_sft and not RLHF.is_sft


def test_sft_overrides_compose_with_verls_sft_config(tmp_path: Path) -> None:
    overrides = stage_overrides(SFT, tmp_path / "ckpt", "/models/base", save_freq=7)
    cfg = compose_verl(overrides, config_name="sft_trainer_engine")
    assert cfg.model.path == "/models/base"
    assert cfg.trainer.default_local_dir == str(tmp_path / "ckpt") and cfg.trainer.save_freq == 7
    assert "hf_model" in cfg.checkpoint.save_contents  # the next stage needs HF weights
    assert unknown_keys(cfg, base=compose_verl(config_name="sft_trainer_engine")) == []


@pytest.mark.parametrize("stage", [RLVR, RLHF], ids=lambda s: s.name)
def test_rl_overrides_start_from_the_previous_model(stage: Stage, tmp_path: Path) -> None:
    cfg = compose_verl(stage_overrides(stage, tmp_path / "ckpt", "/runs/prev/huggingface", save_freq=3))
    assert cfg.actor_rollout_ref.model.path == "/runs/prev/huggingface"
    assert list(cfg.actor_rollout_ref.actor.checkpoint.save_contents) == ["model", "optimizer", "extra", "hf_model"]
    assert cfg.trainer.default_local_dir == str(tmp_path / "ckpt") and cfg.trainer.save_freq == 3
    assert unknown_keys(cfg) == []


def test_progress_total_is_the_composed_step_count() -> None:
    assert total_steps(SFT, []) == 128  # the tiny profile's
    assert total_steps(RLVR, ["trainer.total_training_steps=5"]) == 5
    assert total_steps(SFT, ["ring1t_profile/sft=paper"]) is None  # epochs decide


def test_without_a_model_the_recipe_default_stays(tmp_path: Path) -> None:
    assert not any("model.path" in o for o in stage_overrides(RLVR, tmp_path, None, save_freq=1))
    assert not any("model.path" in o for o in stage_overrides(SFT, tmp_path, None, save_freq=1))


def test_a_missing_plugin_stops_the_pipeline_before_any_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    nowhere = known_plugins.KnownPlugin("ring-ext-nowhere", "ring_ext_nowhere", ())
    monkeypatch.setattr(known_plugins, "KNOWN_PLUGINS", (*known_plugins.KNOWN_PLUGINS, nowhere))
    needy = Stage("x", "ring1t_rlvr", "m", needs=("ring-ext-nowhere",))
    with pytest.raises(PipelineError, match="pip install ring-ext-nowhere"):
        check_plugins([SFT, needy])
    check_plugins(PIPELINES["ring1t"])  # CI installs every plugin


def test_overrides_for_an_unknown_stage_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"unknown stage\(s\) \['rlfh'\]"):
        run_pipeline("ring1t", tmp_path, overrides={"rlfh": ["trainer.total_training_steps=1"]})
    assert not (tmp_path / "sft").exists()  # nothing started


def test_starting_later_needs_the_earlier_stages_model(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="cannot start at 'rl'"):
        run_pipeline("ring1t", tmp_path, start_at="rl")
    with pytest.raises(PipelineError, match="needs the model"):
        run_pipeline("ring1t", tmp_path, start_at="rlvr")
    done = StageResult(model="/m/rlhf", steps=1, metric="critic/score/mean", first=0.0, last=0.1, seconds=1.0)
    PipelineState({"rlhf": done}).save(tmp_path)
    seen: list[str] = []
    run_pipeline("ring1t", tmp_path, start_at="rlhf", model="/m/rlvr", on_stage=lambda s, r: seen.append(s.name))
    assert seen == ["rlhf"]  # sft and rlvr neither run nor reported


def _checkpoint(ckpt: Path, step: int, sub: str, weights: bool = True) -> Path:
    model = ckpt / f"global_step_{step}" / sub
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    if weights:
        (model / "model.safetensors").write_bytes(b"x")
    (ckpt / "latest_checkpointed_iteration.txt").write_text(f"{step}\n")
    return model


def test_stage_model_is_the_last_checkpoints_hf_directory(tmp_path: Path) -> None:
    sft, rl = _checkpoint(tmp_path / "sft", 128, "huggingface"), _checkpoint(tmp_path / "rl", 2, "actor/huggingface")
    assert stage_model(SFT, tmp_path / "sft") == sft
    assert stage_model(RLVR, tmp_path / "rl") == rl


def test_stage_model_errors_name_the_missing_piece(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="missing latest_checkpointed_iteration.txt"):
        stage_model(SFT, tmp_path / "empty")
    _checkpoint(tmp_path / "rl", 2, "actor/huggingface", weights=False)
    with pytest.raises(PipelineError, match="holds no HF weights"):
        stage_model(RLVR, tmp_path / "rl")


def test_state_round_trip_and_finished_stages_are_skipped(tmp_path: Path) -> None:
    done = {
        s.name: StageResult(model=f"/m/{s.name}", steps=2, metric=s.metric, first=0.1, last=0.2, seconds=3.0)
        for s in PIPELINES["ring1t"]
    }
    PipelineState(done).save(tmp_path)
    assert PipelineState.load(tmp_path).stages == done
    seen: list[tuple[str, bool]] = []
    state = run_pipeline("ring1t", tmp_path, on_stage=lambda s, r: seen.append((s.name, r is not None)))
    assert seen == [("sft", True), ("rlvr", True), ("rlhf", True)]  # all reported as done, none run
    assert state.stages == done and not (tmp_path / "sft").exists()


def test_summary_table_has_one_row_per_stage() -> None:
    state = PipelineState({"sft": StageResult("/m", 128, "train/loss", 6.15625, 0.6, 31.0),
                           "rlvr": StageResult("/m2", 2, "critic/score/mean", None, None, 90.4)})
    rows = summary_table(state).splitlines()
    assert rows[2] == "| sft | 128 | train/loss | 6.156 | 0.6 | 31 |"
    assert rows[3] == "| rlvr | 2 | critic/score/mean | - | - | 90 |"


def test_cli_refuses_a_malformed_stage_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="expected STAGE:KEY=VALUE"):
        cli_main(["pipeline", "ring1t", "--workdir", str(tmp_path), "--set", "trainer.total_training_steps=2"])
    assert cli_main(["pipeline", "ring1t", "--workdir", str(tmp_path), "--set", "rlfh:a=1"]) == 2
    assert "unknown stage(s) ['rlfh']" in capsys.readouterr().err


def test_state_file_is_plain_json(tmp_path: Path) -> None:
    PipelineState({"sft": StageResult("/m", 1, "train/loss", 1.0, 0.5, 2.0)}).save(tmp_path)
    raw = OmegaConf.to_container(OmegaConf.load(tmp_path / "pipeline.json"))
    assert raw == {"stages": {"sft": {"model": "/m", "steps": 1, "metric": "train/loss", "first": 1.0,
                                      "last": 0.5, "seconds": 2.0}}}
    assert not list(tmp_path.glob(".*tmp"))  # written atomically

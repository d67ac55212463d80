"""wandb in a verl run: files under the run's directory (the clean end is checked by
tests/test_readme_commands.py's run of README's main command)."""

from __future__ import annotations

import os

import pytest


def test_wandb_files_go_under_the_run_directory(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The start-up check points WANDB_DIR at trainer.default_local_dir (absolute); a user's own WANDB_DIR wins."""
    from omegaconf import OmegaConf

    from ring_ext.wandb_run import keep_wandb_in_the_run_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("RING_EXT_SET_WANDB_DIR", raising=False)
    cfg = OmegaConf.create({"trainer": {"logger": ["console", "wandb"], "default_local_dir": "ckpt/p/e"}})
    keep_wandb_in_the_run_dir(cfg)
    assert os.environ["WANDB_DIR"] == str(tmp_path / "ckpt/p/e")
    cfg.trainer.default_local_dir = "other"  # a second run in the same driver follows its own directory
    keep_wandb_in_the_run_dir(cfg)
    assert os.environ["WANDB_DIR"] == str(tmp_path / "other")
    monkeypatch.setenv("WANDB_DIR", "/mine")
    monkeypatch.delenv("RING_EXT_SET_WANDB_DIR")
    keep_wandb_in_the_run_dir(cfg)
    assert os.environ["WANDB_DIR"] == "/mine"

"""End to end on CPU: `ring-ext pipeline ring1t` (SFT -> RLVR with IcePop + C3PO++ -> RLHF) on the tiny default.

Each stage is verl's own entry point with a real vLLM server for the RL stages. A stage that did not start from
the previous stage's model is caught by the weights: two RL steps move the weights far less than SFT moved them
away from the random init, so each RL stage's output must sit next to its predecessor's, not next to the init.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from subprocess_helpers import ring_ext

from ring_ext.tiny import build_tiny_default

pytestmark = pytest.mark.e2e

SFT_STEPS, RL_STEPS = 64, 2


def ring_ext_pipeline(workdir: Path) -> subprocess.CompletedProcess[str]:
    return ring_ext("pipeline", "ring1t", "--workdir", str(workdir),
                    "--set", f"sft:trainer.total_training_steps={SFT_STEPS}",
                    "--set", f"rlvr:trainer.total_training_steps={RL_STEPS}",
                    "--set", f"rlhf:trainer.total_training_steps={RL_STEPS}", timeout=2400)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("pipeline")
    first = ring_ext_pipeline(workdir)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    print(first.stdout)
    state = json.loads((workdir / "pipeline.json").read_text())["stages"]
    again = ring_ext_pipeline(workdir)  # every stage done: skipped, nothing trained again
    return {"workdir": workdir, "stdout": first.stdout, "state": state, "again": again}


def _weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(next(Path(model_dir).glob("*.safetensors"))).items()}


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    common = sorted(set(a) & set(b))
    assert len(common) >= 20, (sorted(a)[:5], sorted(b)[:5])
    return sum(float((a[k] - b[k]).norm() ** 2) for k in common) ** 0.5


def test_every_stage_ran_its_steps_and_logged_its_metric(run: dict) -> None:
    state = run["state"]
    assert list(state) == ["sft", "rlvr", "rlhf"]
    assert state["sft"]["steps"] == SFT_STEPS and state["sft"]["metric"] == "train/loss"
    # the worked answers are learnable: SFT loss falls well below its start (6.16 on the random init)
    assert state["sft"]["last"] < 0.6 * state["sft"]["first"]
    for name in ("rlvr", "rlhf"):
        assert state[name]["steps"] == RL_STEPS and state[name]["metric"] == "critic/score/mean"
        assert math.isfinite(state[name]["first"]) and math.isfinite(state[name]["last"])
    assert 0.0 <= state["rlvr"]["first"] <= 1.0  # the tiny arithmetic reward's range
    assert "| sft | 64 | train/loss |" in run["stdout"]  # the final summary table


def test_each_stage_starts_from_the_previous_stages_checkpoint(run: dict) -> None:
    state, workdir = run["state"], run["workdir"]
    assert state["sft"]["model"] == str(workdir / "sft/ckpt" / f"global_step_{SFT_STEPS}" / "huggingface")
    assert state["rlvr"]["model"] == str(workdir / "rlvr/ckpt" / f"global_step_{RL_STEPS}" / "actor/huggingface")
    init = _weights(build_tiny_default().model_dir)
    sft, rlvr, rlhf = (_weights(state[s]["model"]) for s in ("sft", "rlvr", "rlhf"))
    sft_moved = _distance(init, sft)
    assert sft_moved > 0
    assert 0 < _distance(sft, rlvr) < 0.5 * sft_moved  # RLVR continued from SFT ...
    assert _distance(init, rlvr) > 0.5 * sft_moved  # ... and not from the random init
    assert 0 < _distance(rlvr, rlhf) < 0.5 * sft_moved
    assert _distance(init, rlhf) > 0.5 * sft_moved


def test_rlvr_stage_trained_with_icepop_and_c3po(run: dict) -> None:
    stage = run["workdir"] / "rlvr"
    assert "ring-ext: policy loss icepop(alpha=0.5, beta=5.0)" in (stage / "rlvr.log").read_text()
    records = [json.loads(line) for line in (stage / "rlvr.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, RL_STEPS + 1))
    for r in records:
        assert r["data"]["c3po/tokens_trained"] >= 512  # the tiny profile's token budget
        # IcePop ran on C3PO++'s batch: its diagnostics are split by the version lag the batch carries
        assert any(k.startswith("actor/mismatch/lag") and k.endswith("/kept_frac") for k in r["data"])


def test_rlhf_stage_is_scored_by_the_tiny_reward_model(run: dict) -> None:
    rm = build_tiny_default(reward_model=True).model_dir
    # verl served the reward model with its own vLLM engine (classify runner) next to the rollout's
    log = (run["workdir"] / "rlhf" / "rlhf.log").read_text()
    assert f"Initializing a V1 LLM engine with config: model='{rm}'" in log
    records = [json.loads(line) for line in (run["workdir"] / "rlhf" / "rlhf.jsonl").read_text().splitlines()]
    scores = [r["data"]["critic/score/mean"] for r in records]
    assert len(scores) == RL_STEPS and all(math.isfinite(v) for v in scores)


def test_rerun_skips_finished_stages(run: dict) -> None:
    again = run["again"]
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already done, skipped") == 3
    assert json.loads((run["workdir"] / "pipeline.json").read_text())["stages"] == run["state"]

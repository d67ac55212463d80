"""End to end on CPU: `trainer.v1.trainer_mode=c3po` under verl's unchanged main_ppo, a real vLLM server.

The engine batch (max_num_seqs=4 sequences) is smaller than the pool (8 groups x 2 samples), so when the token
budget is met some requests are mid-decode: they are aborted, the policy updates, the weights sync and they
resume under the new version. The run stops at step 2 (checkpoint, TransferQueue pools included) and a second
process resumes it to step 4.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from ring_ext.verl_run import run_main_ppo

pytestmark = pytest.mark.e2e

BUDGET, MAX_LEN, SIGMA, HALF, STEPS = 512, 128, 1, 2, 4


def _main_ppo(workdir: Path, steps: int) -> list[dict]:
    return run_main_ppo([
        "+recipe=ring1t",
        "trainer.v1.trainer_mode=c3po",
        f"+trainer.v1.c3po.token_budget={BUDGET}", f"+trainer.v1.c3po.max_retention={SIGMA}",
        "+trainer.v1.c3po.pool_prompts=8",
        f"data.max_response_length={MAX_LEN}", "actor_rollout_ref.rollout.max_num_seqs=4",
        f"trainer.total_training_steps={steps}", f"trainer.save_freq={HALF}",
        f"trainer.default_local_dir={workdir / 'ckpt'}",
    ], workdir, name=f"run_{steps}").steps  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("c3po_e2e")
    first = _main_ppo(workdir, HALF)
    restart_s = time.time()
    second = _main_ppo(workdir, STEPS)  # resume_mode=auto picks up global_step_2
    timeline = [json.loads(line) for line in (workdir / "ckpt" / "c3po_timeline.jsonl").read_text().splitlines()]
    pools = {step: json.loads((workdir / "ckpt" / f"global_step_{step}" / "c3po_pool.json").read_text())
             for step in (HALF, STEPS)}
    partials = json.loads((workdir / "ckpt" / f"global_step_{HALF}" / "c3po_partials.json").read_text())["partials"]
    return {"steps": {s["step"]: s["data"] for s in first + second}, "timeline": timeline, "pools": pools,
            "second_run_steps": [s["step"] for s in second], "partials": partials, "restart_s": restart_s}


def test_every_step_meets_the_budget_and_logs_the_c3po_metrics(run: dict) -> None:
    assert sorted(run["steps"]) == list(range(1, STEPS + 1))
    assert run["second_run_steps"] == [3, 4]  # the second process resumed from the step-2 checkpoint
    for step, d in run["steps"].items():
        assert d["c3po/tokens_trained"] >= BUDGET, step
        assert d["c3po/budget_used"] == pytest.approx(d["c3po/tokens_trained"] / BUDGET)
        for key in ("c3po/version_lag/mean", "c3po/groups_in_flight_at_cut", "c3po/groups_purged",
                    "c3po/trainer_wait_s", "actor/pg_loss"):
            assert key in d, (step, key)


def test_some_trajectories_span_two_policy_versions(run: dict) -> None:
    spanning = [r for r in run["timeline"] if not r["purged"] and len({s[0] for s in r["segments"]}) >= 2]
    assert spanning, "no trained request was resumed under new weights"
    assert sum(d["c3po/trajectories_multi_version"] for d in run["steps"].values()) == len(spanning)
    assert any(d["c3po/version_lag/max"] >= 1 for d in run["steps"].values())


def test_segments_account_each_token_once_and_versions_never_go_back(run: dict) -> None:
    trained = [r for r in run["timeline"] if not r["purged"]]
    per_step = Counter()
    for r in trained:
        versions = [s[0] for s in r["segments"]]
        assert versions == sorted(versions)
        assert max(versions) <= r["step"] - 1  # nothing decoded by weights newer than the step's policy
        assert r["step"] - 1 - min(versions) <= SIGMA + 1  # the retention bound (+1: see README, C3PO++)
        tokens = sum(s[1] for s in r["segments"])
        assert 0 < tokens <= MAX_LEN
        per_step[r["step"]] += tokens
    for step, d in run["steps"].items():  # the segments add up to verl's response lengths of the batch
        assert per_step[step] == d["c3po/tokens_trained"], step


def uid(key: str) -> str:
    return key.split("_")[0]  # verl's trajectory key: {uid}_{session}_{index}


def test_restart_neither_loses_nor_duplicates_a_trajectory(run: dict) -> None:
    trained = [r for r in run["timeline"] if not r["purged"]]
    keys = [r["key"] for r in trained]
    assert len(keys) == len(set(keys)), "a trajectory was trained twice"
    before = {uid(r["key"]) for r in trained if r["step"] <= HALF}
    after = {uid(r["key"]) for r in trained if r["step"] > HALF}
    purged = {uid(r["key"]) for r in run["timeline"] if r["purged"]}
    pool_at_restart = set(run["pools"][HALF]["groups"])
    assert pool_at_restart, "nothing was in the pool at the checkpoint: the restart proves nothing"
    assert not pool_at_restart & before, "a group trained before the checkpoint is still in its pool"
    lost = pool_at_restart - after - purged - set(run["pools"][STEPS]["groups"])
    assert not lost, f"groups in the step-{HALF} pool never trained, purged or kept after the restart: {lost}"


def test_partial_trajectories_resume_token_by_token_after_the_restart(run: dict) -> None:
    """The step-2 checkpoint holds the requests its abort cut short; after the restart they continue from their
    saved tokens (decoded before the restart, under the earlier weights) instead of starting over."""
    saved = run["partials"]
    assert saved, "no request was cut short at the checkpoint: the restart restores nothing"
    assert all(0 < len(p["token_ids"]) < MAX_LEN and 1 <= p["retention"] <= SIGMA for p in saved)
    resumed = [r for r in run["timeline"] if r["step"] > HALF and r["restored_tokens"]]
    assert resumed, "no trajectory after the restart continued from a saved partial"
    assert Counter(r["restored_tokens"] for r in resumed) <= Counter(len(p["token_ids"]) for p in saved)
    for r in resumed:  # its first tokens were decoded by the first process, the rest after the restart
        before = [s for s in r["segments"] if s[2] < run["restart_s"]]
        after = [s for s in r["segments"] if s[2] >= run["restart_s"]]
        assert sum(s[1] for s in before) == r["restored_tokens"]
        # a trained one went on decoding under the checkpoint's (newer) weights
        assert r["purged"] or (after and max(s[0] for s in before) < min(s[0] for s in after))
    assert run["steps"][HALF + 1]["c3po/partials_unclaimed"] <= len(saved)
    assert run["steps"][STEPS]["c3po/partials_unclaimed"] == 0  # every saved partial was taken up

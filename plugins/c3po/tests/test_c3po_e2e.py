"""End to end on CPU: `+recipe=ring1t` (GRPO + IcePop + C3PO++) under verl's unchanged main_ppo, a real vLLM server.

The recipe as a user gets it: the tiny policy's lengths have a tail and the pool holds about twice the budget, so
when the budget is met some requests are mid-decode: they are aborted, the policy updates, the weights sync and
they resume under the new version, and IcePop sees their tokens of two versions in one batch. The run stops at
step 2 (checkpoint, TransferQueue pools and partial trajectories included) and a second process resumes it to
step 4. A second run is the case that used to hang (a pool that finishes under the budget) with an IcePop band
tight enough to reject tokens.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ring_ext.verl_run import VerlRun, run_main_ppo

if TYPE_CHECKING:
    from typing import Any

pytestmark = pytest.mark.e2e

BUDGET, MAX_LEN, SIGMA, HALF, STEPS = 256, 64, 1, 2, 4  # the recipe's values (ring_ext/hydra_conf/recipe/ring1t.yaml)


def _main_ppo(workdir: Path, steps: int, *extra: str) -> VerlRun:
    return run_main_ppo([
        "+recipe=ring1t", f"trainer.total_training_steps={steps}", f"trainer.save_freq={HALF}",
        f"trainer.default_local_dir={workdir / 'ckpt'}", *extra,
    ], workdir, name=f"run_{steps}")  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("c3po_e2e")
    first = _main_ppo(workdir, HALF)
    log = first.log
    first = first.steps
    restart_s = time.time()
    second = _main_ppo(workdir, STEPS).steps  # resume_mode=auto picks up global_step_2
    timeline = [json.loads(line) for line in (workdir / "ckpt" / "c3po_timeline.jsonl").read_text().splitlines()]
    pools = {step: json.loads((workdir / "ckpt" / f"global_step_{step}" / "c3po_pool.json").read_text())
             for step in (HALF, STEPS)}
    partials = json.loads((workdir / "ckpt" / f"global_step_{HALF}" / "c3po_partials.json").read_text())["partials"]
    return {"steps": {s["step"]: s["data"] for s in first + second}, "timeline": timeline, "pools": pools,
            "second_run_steps": [s["step"] for s in second], "partials": partials, "restart_s": restart_s, "log": log}


def test_the_start_up_log_names_each_technique_and_its_knobs(run: dict) -> None:
    assert f"C3PO++ partial rollouts on: token_budget(Phi)={BUDGET} pool_prompts(Omega)=24 max_retention(sigma)=1" \
        in run["log"]
    assert "policy loss icepop(alpha=0.5, beta=5.0) on the rollout engine's log-probs" in run["log"]
    # weights move through astate, in place, at every sync (the initial one and one per step)
    assert "weight sync in place through astate into every vLLM worker's parameters" in run["log"]
    assert re.search(r"rollout worker 0 writes in place: 26 checkpoint tensors -> \d+ parameters", run["log"])
    synced = re.findall(r"sync (\d+) into rollout worker 0 in place: .* verified=(\w+), attempts=1", run["log"])
    assert [int(v) for v, _ in synced] == list(range(1, HALF + 2)), synced
    assert synced[0][1] == "True" and synced[1][1] == "False"  # audit: the first sync hashes every byte


def test_partial_rollouts_really_happen_and_the_cut_is_tight(run: dict) -> None:
    """Most steps train requests decoded under two policy versions; the phase ends at the crossing completion."""
    steps = run["steps"].values()
    assert sum(d["c3po/trajectories_multi_version"] > 0 for d in steps) >= STEPS // 2
    assert sum(d["c3po/version_lag/max"] >= 1 for d in steps) >= STEPS // 2
    assert statistics.median(d["c3po/budget_used"] for d in steps) <= 1.2
    assert sum(d["c3po/gate_cut"] == 1.0 for d in steps) >= STEPS // 2  # the gate, not the trainer's poll, cut


def test_icepop_diagnostics_are_split_by_version_lag(run: dict) -> None:
    """Stale (lag 1) and fresh (lag 0) tokens each get their own mismatch diagnostics, for exactly the lags the batch
    holds (a step may train only groups that finished before the sync: lag 1 alone)."""
    names = ("k1", "k3", "kept_frac", "masked_below_frac", "masked_above_frac")
    for step, d in run["steps"].items():
        lags = sorted({int(k.split("/")[2][3:]) for k in d if k.startswith("actor/mismatch/lag")})
        assert lags and max(lags) == d["c3po/version_lag/max"], step
        assert (0 in lags) == (d["c3po/stale_token_fraction"] < 1.0), step
        assert all(math.isfinite(d[f"actor/mismatch/lag{lag}/{name}"]) for lag in lags for name in names), step
    both = [d for d in run["steps"].values() if {"actor/mismatch/lag0/k3", "actor/mismatch/lag1/k3"} <= d.keys()]
    assert both, "no step trained fresh and stale tokens together"
    # stale tokens were decoded by the weights before the last update: they drift further from the trainer
    assert statistics.mean(d["actor/mismatch/lag1/k3"] for d in both) > statistics.mean(
        d["actor/mismatch/lag0/k3"] for d in both)


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


@pytest.fixture(scope="module")
def refill(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The case that used to wait forever: 4 groups in flight hold ~160 tokens, fewer than Phi, so the phase can end
    only if finished groups are replaced while the engine decodes. IcePop [0.98, 1.02] rejects some tokens. Every
    version's HF weights and every trained request's tokens and rollout log-probs are kept for the checks below."""
    workdir = tmp_path_factory.mktemp("c3po_refill")
    run = run_main_ppo([
        "+recipe=ring1t", "trainer.total_training_steps=3", "trainer.v1.c3po.pool_prompts=4",
        "actor_rollout_ref.actor.policy_loss.icepop_alpha=0.98", "actor_rollout_ref.actor.policy_loss.icepop_beta=1.02",
        "+trainer.v1.c3po.timeline_tokens=true", "trainer.save_freq=1",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        f"trainer.default_local_dir={workdir / 'ckpt'}",
    ], workdir, name="refill", timeout=900)  # fmt: skip
    timeline = [json.loads(line) for line in (workdir / "ckpt" / "c3po_timeline.jsonl").read_text().splitlines()]
    return {"steps": run.steps, "timeline": timeline, "ckpt": workdir / "ckpt"}


def test_a_pool_that_finishes_under_the_budget_refills_and_a_tight_band_masks(refill: dict) -> None:
    data = [s["data"] for s in refill["steps"]]
    assert [s["step"] for s in refill["steps"]] == [1, 2, 3]
    for d in data:
        assert d["c3po/tokens_trained"] >= BUDGET
        assert d["c3po/prompts_added"] >= 1  # replaced while decoding: the pool alone never holds Phi
    assert any(d["actor/mismatch/kept_frac"] < 1.0 for d in data)
    assert all(math.isfinite(d["actor/pg_loss"]) and math.isfinite(d["actor/grad_norm"]) for d in data)


def _policy(ckpt: Path, version: int):
    """The weights that decoded version `version`'s tokens: the initial model, or those saved after step `version`."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ring_ext.tiny import build_tiny_default

    model = AutoModelForCausalLM.from_pretrained(build_tiny_default().model_dir, dtype=torch.float32)
    if version:
        hf = ckpt / f"global_step_{version}" / "actor" / "huggingface"
        state = {k: v.float() for f in sorted(hf.glob("*.safetensors")) for k, v in load_file(f).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied to the embedding
        model.tie_weights()
    return model.eval()


def test_each_segment_s_rollout_log_probs_are_those_of_the_weights_that_decoded_it(refill: dict) -> None:
    """Resumed trajectories: rollout log-probs line up 1:1 with the response tokens, and each segment's log-probs
    match the checkpoint of the version that decoded it, not the neighbouring version's."""
    import torch

    trained = [r for r in refill["timeline"] if not r["purged"]]
    for r in trained:
        assert len(r["rollout_log_probs"]) == len(r["response_ids"]) == sum(seg[1] for seg in r["segments"]), r["key"]
    spanning = [r for r in trained if len({seg[0] for seg in r["segments"]}) > 1]
    assert spanning, "no trained request spans two policy versions"
    models: dict[int, Any] = {}
    own, other = [], []
    for r in spanning:
        ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
        n_prompt = len(r["prompt_ids"])
        logp = {}
        for version in {seg[0] for seg in r["segments"]}:
            model = models.setdefault(version, _policy(refill["ckpt"], version))
            with torch.no_grad():
                logits = model(ids).logits[0, n_prompt - 1:-1].float()
            logp[version] = torch.log_softmax(logits, -1).gather(-1, ids[0, n_prompt:, None])[:, 0]
        rollout = torch.tensor(r["rollout_log_probs"])
        start = 0
        for version, tokens, *_ in r["segments"]:
            span = slice(start, start + tokens)
            neighbour = min((v for v in logp if v != version), key=lambda v: abs(v - version))
            own += (rollout[span] - logp[version][span]).abs().tolist()
            other += (rollout[span] - logp[neighbour][span]).abs().tolist()
            start += tokens
    # vLLM's bf16 kernels against an fp32 forward of the same weights: ~0.01; one update apart: several times more
    assert statistics.mean(own) < 0.05, statistics.mean(own)
    assert statistics.mean(other) > 2 * statistics.mean(own), (statistics.mean(own), statistics.mean(other))

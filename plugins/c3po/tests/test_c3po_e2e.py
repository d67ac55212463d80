"""End to end on CPU: `+recipe=ring1t` (GRPO + IcePop + C3PO++) under verl's unchanged main_ppo, a real vLLM server.

The recipe as a user gets it: the tiny policy's lengths have a tail and the pool holds about twice the budget, so
when the budget is met some requests are mid-decode: they are aborted, the policy updates, the weights sync and
they resume under the new version, and IcePop sees their tokens of two versions in one batch. The run is the
session's `ring1t_run` (tests/shared_runs.py): README's command as written, 3 steps ending in a checkpoint
(TransferQueue pools and partial trajectories included), then a second process that resumes it to step 6. The
case that used to hang (a pool that finishes under the budget) with an IcePop band tight enough to reject tokens is
read from the session's two-host run (`c3po_two_hosts_run`), where rollout clients decode on both nodes and the cut
keeps requests in the engine (`carry=keep`): its tokens are checked against every version's weights.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from shared_runs import (C3PO_TWO_HOSTS_BUDGET, C3PO_TWO_HOSTS_SEQS, C3PO_TWO_HOSTS_STEPS, RING1T_FIRST, RING1T_STEPS,
                         ResumedRun)


if TYPE_CHECKING:
    from typing import Any

pytestmark = pytest.mark.e2e

BUDGET, MAX_LEN, SIGMA = 256, 64, 1  # the recipe's values (ring_ext/hydra_conf/recipe/ring1t.yaml)
HALF, STEPS = RING1T_FIRST, RING1T_STEPS  # the first process's last step (its checkpoint), the resumed run's


@pytest.fixture(scope="module")
def run(ring1t_run: ResumedRun) -> dict:
    ckpt = ring1t_run.ckpt
    timeline = [json.loads(line) for line in (ckpt / "c3po_timeline.jsonl").read_text().splitlines()]
    pools = {step: json.loads((ckpt / f"global_step_{step}" / "c3po_pool.json").read_text()) for step in (HALF, STEPS)}
    partials = json.loads((ckpt / f"global_step_{HALF}" / "c3po_partials.json").read_text())["partials"]
    steps = {step: data for step, data in ring1t_run.steps.items() if step > 0}
    return {"steps": steps, "timeline": timeline, "pools": pools, "second_run_steps": ring1t_run.second_steps,
            "partials": partials, "restart_s": ring1t_run.restart_s, "log": ring1t_run.log}


def test_the_start_up_log_names_each_technique_and_its_knobs(run: dict) -> None:
    assert f"C3PO++ partial rollouts on: token_budget(Phi)={BUDGET} pool_prompts(Omega)=24 max_retention(sigma)=1" \
        in run["log"]
    assert "policy loss icepop(alpha=0.5, beta=5.0) on the rollout engine's log-probs" in run["log"]
    # weights move through astate, in place, at every sync (the initial one and one per step)
    assert "weight sync in place through astate into every vLLM worker's parameters" in run["log"]
    assert re.search(r"rollout worker 0 writes in place: 26 checkpoint tensors -> \d+ parameters", run["log"])
    # each line once or twice: two nodes on one machine, and Ray's de-duplication of repeated lines is timing-dependent
    synced = list(dict.fromkeys(re.findall(r"sync (\d+) into rollout worker 0 in place: .* verified=(\w+), attempts=1",
                                           run["log"])))
    assert [int(v) for v, _ in synced] == list(range(1, HALF + 2)), synced
    assert synced[0][1] == "True" and synced[1][1] == "False"  # audit: the first sync hashes every byte


def test_partial_rollouts_really_happen_and_the_cut_is_tight(run: dict) -> None:
    """Most steps train requests decoded under two policy versions; the phase ends at the crossing completion."""
    steps = run["steps"].values()
    assert sum(d["c3po/trajectories_multi_version"] > 0 for d in steps) >= (STEPS + 1) // 2
    assert sum(d["c3po/version_lag/max"] >= 1 for d in steps) >= (STEPS + 1) // 2
    assert statistics.median(d["c3po/budget_used"] for d in steps) <= 1.2
    assert sum(d["c3po/gate_cut"] == 1.0 for d in steps) >= (STEPS + 1) // 2  # the gate, not the trainer's poll, cut


def test_each_phase_starts_with_what_the_last_batch_deferred_across_the_restart_too(run: dict) -> None:
    """C at a phase's start = the tokens of the finished groups the last batch left (Algorithm 1). Across the
    restart the resumed process's gate starts from the checkpoint's finished groups: counted from zero it let the
    engine decode a second budget's worth that the next step then trained alone, all of it stale."""
    steps = run["steps"]
    assert steps[1]["c3po/gate_carried_tokens"] == 0
    carried = [(s, steps[s]["c3po/gate_carried_tokens"], steps[s - 1]["c3po/deferred_tokens"])
               for s in range(2, STEPS + 1)]
    assert all(now == left for _, now, left in carried), carried


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


def test_the_resumed_run_bands_icepop_per_version_lag(run: dict, ring1t_run: ResumedRun) -> None:
    """The second process sets `icepop_lag_bands` (lag 0: [0.5, 5], lag 1 and older: [0.3, 8]): its start-up log
    names the bands and every step after the restart reports, per lag it trained, the band that lag used; the first
    process used [0.5, 5] for every lag."""
    assert ("policy loss icepop(alpha=0.5, beta=5.0, lag_bands={0: (0.5, 5.0), 1: (0.3, 8.0)}) on the rollout "
            "engine's log-probs") in ring1t_run.second_log
    bands = {0: (0.5, 5.0), 1: (0.3, 8.0)}
    seen = set()
    for step, d in run["steps"].items():
        for lag in (0, 1):
            if f"actor/mismatch/lag{lag}/band_lo" not in d:
                continue
            band = (d[f"actor/mismatch/lag{lag}/band_lo"], d[f"actor/mismatch/lag{lag}/band_hi"])
            assert band == (bands[lag] if step > HALF else (0.5, 5.0)), (step, lag, band)
            seen.add((step > HALF, lag))
    assert {(True, 0), (True, 1)} <= seen, f"after the restart, lag 0 or lag 1 reported no band: {seen}"


def test_the_run_ends_with_its_summary_and_figures(ring1t_run: ResumedRun) -> None:
    """Both processes print the run's summary last (ring_ext.run_record); the resumed one's covers steps 1-6, its
    numbers equal the logged metrics of both processes, and its figures are in the run folder (tests/report_checks.py).
    `ring-ext report` on the folder prints the same summary."""
    from report_checks import check_real_run

    from ring_ext.report import SUMMARY_TXT

    first_tail = ring1t_run.log.rstrip().splitlines()[-40:]
    assert any("ring-ext run summary" in line and "steps 1-3" in line for line in first_tail), "\n".join(first_tail)
    check_real_run(ring1t_run.ckpt, ring1t_run.records, ring1t_run.second_log)
    summary = (ring1t_run.ckpt / SUMMARY_TXT).read_text()
    assert f"steps 1-{STEPS}" in summary.splitlines()[0]
    report = subprocess.run([sys.executable, "-m", "ring_ext.cli", "report", str(ring1t_run.ckpt)],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0 and report.stdout == summary, report.stderr[-2000:]


def test_every_step_meets_the_budget_and_logs_the_c3po_metrics(run: dict) -> None:
    assert sorted(run["steps"]) == list(range(1, STEPS + 1))
    assert run["second_run_steps"] == list(range(HALF + 1, STEPS + 1))  # resumed from step 3
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
        assert r["step"] - 1 - min(versions) <= SIGMA  # the staleness bound (rules.staleness)
        tokens = sum(s[1] for s in r["segments"])
        assert 0 < tokens <= MAX_LEN
        per_step[r["step"]] += tokens
    for step, d in run["steps"].items():  # the segments add up to verl's response lengths of the batch
        assert per_step[step] == d["c3po/tokens_trained"], step
        # every step, before and after the restart: no trained token lags more than sigma
        assert d["c3po/version_lag/max"] <= SIGMA, step


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
    """The step-3 checkpoint holds the requests its abort cut short; after the restart they continue from their
    saved tokens (decoded before the restart, under the earlier weights) instead of starting over."""
    saved = run["partials"]
    assert saved, "no request was cut short at the checkpoint: the restart restores nothing"
    assert all(0 < len(p["token_ids"]) < MAX_LEN and 1 <= p["retention"] <= SIGMA for p in saved)
    # keyed by verl's uid and session (the client got them inside verl's agent-loop workers), never the prompt hash
    assert all(p["session"] is not None and p["group"] in run["pools"][HALF]["groups"] for p in saved)
    resumed = [r for r in run["timeline"] if r["step"] > HALF and r["restored_tokens"]]
    assert resumed, "no trajectory after the restart continued from a saved partial"
    own = {(p["group"], p["session"]): len(p["token_ids"]) for p in saved}
    for r in resumed:  # each resumed its own request's partial: {uid}_{session}_{index}
        assert own[tuple(r["key"].split("_")[:2])] == r["restored_tokens"], r["key"]
    for r in resumed:  # its first tokens were decoded by the first process, the rest after the restart
        before = [s for s in r["segments"] if s[2] < run["restart_s"]]
        after = [s for s in r["segments"] if s[2] >= run["restart_s"]]
        assert sum(s[1] for s in before) == r["restored_tokens"]
        # a trained one went on decoding under the checkpoint's (newer) weights
        assert r["purged"] or (after and max(s[0] for s in before) < min(s[0] for s in after))
    assert run["steps"][HALF + 1]["c3po/partials_unclaimed"] <= len(saved)
    assert run["steps"][STEPS]["c3po/partials_unclaimed"] == 0  # every saved partial was taken up


@pytest.fixture(scope="module")
def refill(c3po_two_hosts_run: dict) -> dict:
    """The case that used to wait forever: 8 groups in flight hold ~400 tokens, fewer than Phi, so the phase can end
    only if finished groups are replaced while the engine decodes. IcePop [0.98, 1.02] rejects some tokens. Every
    version's HF weights and every trained request's tokens and rollout log-probs are kept for the checks below.
    The run is the session's two-host one (tests/shared_runs.py): its clients decode on both nodes."""
    return c3po_two_hosts_run


def test_a_pool_that_finishes_under_the_budget_refills_and_a_tight_band_masks(refill: dict) -> None:
    data = [s["data"] for s in refill["steps"]]
    assert [s["step"] for s in refill["steps"]] == list(range(1, C3PO_TWO_HOSTS_STEPS + 1))
    for d in data:
        assert d["c3po/tokens_trained"] >= C3PO_TWO_HOSTS_BUDGET  # every phase reached Phi: none waited forever
    # replaced while decoding: the pool alone does not hold Phi. Not every phase needs it: one that starts from groups
    # the last step left finished (`gate_carried_tokens`, up to 316 of Phi's 768 seen in CI) or whose groups admitted
    # at its start happen to be long (once in CI: 3 added at the start, none during, 800 tokens trained) may not
    assert any(d["c3po/prompts_added"] >= 1 for d in data if d["c3po/gate_carried_tokens"] == 0), data
    assert any(d["actor/mismatch/kept_frac"] < 1.0 for d in data)
    assert all(math.isfinite(d["actor/pg_loss"]) and math.isfinite(d["actor/grad_norm"]) for d in data)


def test_the_adaptive_cut_decides_at_every_crossing_and_a_skipped_cut_trains_every_finished_group(
        refill: dict) -> None:
    """adaptive_cut=true (the two-host run, carry=keep): at every crossing the gate decided, and a wait is bounded by
    what a cut was measured to cost (keep's returns nothing at the cut: about 0 s here) plus one round trip to the
    engines, so keep's cut is never held up; a phase that ended without a cut defers nothing, since every group that
    finished while the gate waited trains now. Which way each crossing goes is the machine's timing:
    tests/test_adaptive.py scripts a skipped cut, a taken one and a wait that outlasts the cut's cost."""
    assert "adaptive_cut=true" in refill["log"]  # the start-up line names it
    for s in refill["steps"]:
        d = s["data"]
        if d["c3po/gate_cut"] == 0.0:  # the trainer's poll reached Phi first: no crossing, no decision
            assert "c3po/cut_skipped" not in d
            continue
        assert d["c3po/cut_skipped"] in (0.0, 1.0) and 0.0 <= d["c3po/cut_wait_s"] < 0.5, s["step"]
        if d["c3po/cut_skipped"] == 1.0:
            assert d["c3po/groups_deferred"] == 0, s["step"]


def test_admission_at_completion_holds_the_engine_to_its_batch(refill: dict) -> None:
    """admission=completion (the two-host run: an engine batch of 12 sequences, Omega 8 groups of 2 submitted): at
    no moment do more requests decode than the batch and the rest of one group (a group enters whole), where verl's
    admission sends all 16 to the engine; the groups held back wait at the gate when the phase ends."""
    assert "admission=completion" in refill["log"]  # the start-up line names it
    spans = [(r["segments"][0][2], r["segments"][-1][3]) for r in refill["timeline"] if r["segments"]]
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])  # at a tie the end comes first
    most = max(itertools.accumulate(step for _, step in events))
    assert C3PO_TWO_HOSTS_SEQS // 2 <= most <= C3PO_TWO_HOSTS_SEQS + 1, most  # rollout.n = 2
    assert max(s["data"]["c3po/groups_waiting_at_cut"] for s in refill["steps"]) >= 1


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


def _log_probs(model: Any, ids: Any, start: int, past: Any = None) -> Any:
    """log p(ids[t] | ids[:t]) for t >= start + 1 from `model` fed ids[start:] (over `past`: the KV of ids[:start])."""
    import torch

    with torch.no_grad():
        logits = model(ids[:, start:], past_key_values=past, use_cache=past is not None).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, start + 1:, None])[:, 0]


def test_kept_requests_decode_under_the_new_weights_over_the_older_kv(refill: dict) -> None:
    """carry=keep (the two-host run): trajectories span versions with nothing prefilled again; each trajectory's
    first piece has the rollout log-probs of the weights that decoded it, not the next version's; the tokens after a
    sync come from the new weights attending over the KV the older weights computed before the pause: an HF forward
    that does exactly that (the old model's cache up to the last token decoded before the pause, the new model from
    there) matches them better than either version's whole forward (the weights changed while the requests were
    paused, and the KV was kept)."""
    import torch

    data = [s["data"] for s in refill["steps"]]
    assert all(d["c3po/reprefill_tokens"] == 0 for d in data)  # nothing resubmitted with its tokens
    assert "carry=keep" in refill["log"]  # the start-up line names the carry mode
    trained = [r for r in refill["timeline"] if not r["purged"]]
    for r in trained:
        assert len(r["rollout_log_probs"]) == len(r["response_ids"]) == sum(seg[1] for seg in r["segments"]), r["key"]
    spanning = [r for r in trained if len(r["segments"]) == 2 and r["segments"][0][1] > 0
                and r["segments"][0][0] != r["segments"][1][0]]
    assert spanning, "no trained request was kept across a sync"
    models: dict[int, Any] = {}
    model = lambda v: models.setdefault(v, _policy(refill["ckpt"], v))  # noqa: E731
    first_own, first_next, kept, new_whole, old_whole = [], [], [], [], []
    for r in spanning:
        (v0, t0, *_), (v1, _t1, *_) = r["segments"]
        ids, n = torch.tensor([r["prompt_ids"] + r["response_ids"]]), len(r["prompt_ids"])
        rollout = torch.tensor(r["rollout_log_probs"])
        whole = {v: _log_probs(model(v), ids, 0)[n - 1:] for v in (v0, v1)}
        first_own += (rollout[:t0] - whole[v0][:t0]).abs().tolist()
        first_next += (rollout[:t0] - whole[v1][:t0]).abs().tolist()
        cut = n + t0 - 1  # the last token decoded before the pause is fed (its KV computed) after the resume
        with torch.no_grad():
            past = model(v0)(ids[:, :cut], use_cache=True).past_key_values
        kept += (rollout[t0:] - _log_probs(model(v1), ids, cut, past)).abs().tolist()
        new_whole += (rollout[t0:] - whole[v1][t0:]).abs().tolist()
        old_whole += (rollout[t0:] - whole[v0][t0:]).abs().tolist()
    mean = statistics.mean
    # vLLM's bf16 kernels against an fp32 forward of the same weights: ~0.002 here; one update apart: several times
    assert mean(first_own) < 0.05 and mean(first_next) > 2 * mean(first_own), (mean(first_own), mean(first_next))
    assert mean(kept) < min(mean(new_whole), mean(old_whole)) / 1.5, (mean(kept), mean(new_whole), mean(old_whole))

"""Tests of ring_ext_c3po.simulator: closed-form times, no-tail equality, tail speed-up, exactly-once accounting,
version-lag bounds, determinism, and the benchmark CLI."""

from __future__ import annotations

import importlib.util
import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from ring_ext_c3po.simulator import Engine, Lengths, SimConfig, compare, run_c3po, run_sync

UNIT = {"step_fixed_s": 1.0, "step_per_seq_s": 0.5, "prefill_per_token_s": 0.25, "prompt_length": 4,
        "train_fixed_s": 0.0, "train_per_token_s": 0.0, "sync_s": 0.0, "token_quantum": 1}
SMALL = SimConfig(prompts_per_step=4, group_size=2, steps=6, max_response_length=512, length_median=32.0,
                  length_sigma=1.2, prompt_length=16, token_quantum=1, step_fixed_s=0.01, step_per_seq_s=1e-3,
                  prefill_per_token_s=1e-5, train_fixed_s=1.0, train_per_token_s=1e-3, sync_s=0.2, max_retention=2)


def test_engine_two_lengths_closed_form():
    """Lengths 2 and 6, batch 2: 2 steps at n=2 then 4 at n=1; prefill 2 x 4 tokens x 0.25 s."""
    cfg = SimConfig(prompts_per_step=1, group_size=2, max_response_length=8, **UNIT)
    eng = Engine(cfg)
    eng.submit("x", 0, 2), eng.submit("y", 0, 6), eng.fill()
    assert eng.advance() == ["x"] and eng.clock == pytest.approx(2 + 2 * 2.0)
    assert eng.advance() == ["y"] and eng.clock == pytest.approx(2 + 2 * 2.0 + 4 * 1.5)
    assert eng.idle_s == pytest.approx(4 * 1.5 / 2) and eng.decoded == 8 and eng.prefill_s == pytest.approx(2)


def test_engine_context_cost_closed_form():
    """Same run with k = 0.1 s per context token per step: contexts (4, 5) twice, then y alone at 6, 7, 8, 9."""
    cfg = SimConfig(prompts_per_step=1, group_size=2, max_response_length=8, step_per_context_token_s=0.1, **UNIT)
    eng = Engine(cfg)
    eng.submit("x", 0, 2), eng.submit("y", 0, 6), eng.fill()
    assert eng.advance() == ["x"] and eng.clock == pytest.approx(2 + 2 * 2.0 + 0.1 * (4 + 5) * 2)
    assert eng.advance() == ["y"] and eng.clock == pytest.approx(2 + 4 + 1.8 + 4 * 1.5 + 0.1 * (6 + 7 + 8 + 9))
    eng.submit("z", 3, 2), eng.fill()  # a resumed request: its context starts at prompt + prefix = 7
    assert eng.advance() == ["z"] and eng.clock == pytest.approx(16.8 + 0.25 * 7 + 2 * 1.5 + 0.1 * (7 + 8))


def test_engine_decodes_until_a_queued_request_is_ready_then_admits_it():
    """x (2 tokens) decodes alone; y reaches the engine at t = 2 (an admission latency): one step at n = 1 (1.5 s,
    t = 2.5), y's prefill (1 s), one step at n = 2 finishes x, one at n = 1 finishes y. z arrives at t = 10 on an empty
    engine: the engine idles until then."""
    cfg = SimConfig(prompts_per_step=1, group_size=2, max_response_length=8, **UNIT)
    eng = Engine(cfg)
    eng.submit("x", 0, 2), eng.fill()  # prefill 1 s
    eng.submit("y", 0, 2, ready_at=2.0), eng.fill()
    assert eng.queue and eng.advance() == [] and eng.clock == pytest.approx(2.5)
    eng.fill()
    assert not eng.queue and eng.advance() == ["x"] and eng.clock == pytest.approx(3.5 + 2.0)
    assert eng.advance() == ["y"] and eng.clock == pytest.approx(7.0)
    eng.submit("z", 0, 1, ready_at=10.0)
    assert eng.advance() == [] and eng.clock == 10.0 and eng.idle_s == pytest.approx(1.5 / 2 + 0.75 + 3.0)


@pytest.mark.parametrize("latency, cut", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.3), (0.5, 0.3)])
def test_cut_cost_and_admission_latency_are_charged_to_each_phase(latency, cut):
    """G = 1, P = 2, batch 2, Omega 2, every length 10, Phi 40, 1 s per decode step, no prefill: each phase decodes
    two requests (10 s), waits `latency` for their replacements, decodes those (10 s), crosses Phi and pays `cut`."""
    cfg = SimConfig(prompts_per_step=2, group_size=1, steps=2, max_response_length=16, max_batch=2, pool_prompts=2,
                    **{**UNIT, "step_per_seq_s": 0.0, "prefill_per_token_s": 0.0}, admission_latency_s=latency,
                    cut_s=cut)
    c3po, _ = run_c3po(cfg, 80, 40, Lengths.fixed(cfg, [[10]] * 8))
    assert c3po.steps == 2 and c3po.rollout_s == pytest.approx(2 * (20 + latency + cut))
    assert c3po.idle_s == pytest.approx(2 * latency)  # the engine was empty while the replacements were on their way


def test_hand_computed_run_both_policies():
    """Every prompt has lengths (2, 6); P=1, G=2, batch 2, Omega 2 groups, Phi 8. See the step-by-step in the comments:
    sync step = 2 (prefill) + 2*2 + 4*1.5 = 12 s. C3PO++ iteration 1: prefills 0/0, 0/1, then 1/0 at step 2, 1/1 at
    step 4 (4 s), 6 steps at n=2 (12 s); group 0 completes at step 6, 1/1 aborted with 2 tokens. Iterations 2, 3:
    resume 1/1 (prefill 4+2 tokens = 1.5 s), 2/0 (1 s), 2/1 at step 2 (1 s); group 1 completes at step 4 (8 s)."""
    cfg = SimConfig(prompts_per_step=1, group_size=2, steps=3, max_response_length=8, max_batch=2, pool_prompts=2,
                    max_retention=5, **UNIT)
    lengths = Lengths.fixed(cfg, [[2, 6]] * 4)
    sync = run_sync(cfg, lengths)
    assert (sync.rollout_s, sync.idle_s, sync.trained_tokens) == (pytest.approx(36), pytest.approx(9), 24)
    results = []
    c3po, sched = run_c3po(cfg, 24, 8, lengths, on_iteration=results.append)
    assert [r.trained_tokens for r in results] == [8, 8, 8] and c3po.trained_tokens == 24
    assert c3po.rollout_s == pytest.approx(16 + 11.5 + 11.5) and c3po.idle_s == 0 and c3po.decoded_tokens == 28
    assert [r.version_lag for r in results] == [{0: 8}, {0: 4, 1: 4}, {0: 4, 1: 4}]
    assert c3po.summary()["mean_version_lag"] == pytest.approx(8 / 24)
    state = sched.state_dict()
    # unfinished, or finished after the last crossing; group 3: 3/0 finished (2 tokens), 3/1 aborted at 2 of 6
    pool = state["inference_pool"] + state["training_pool"]
    assert [[len(t["tokens"]) for t in g["trajectories"]] for g in pool] == [[2, 2]]


@pytest.mark.parametrize("max_batch, pool_prompts", [(8, None), (4, 2), (2, 1), (4, None), (2, None)])
def test_no_tail_means_no_gain(max_batch, pool_prompts):
    """All lengths equal: every phase ends when the same P groups end, so C3PO++ is the sync baseline exactly
    (engine in waves when max_batch < P*G)."""
    cfg = replace(SMALL, length_sigma=0.0, max_batch=max_batch, pool_prompts=pool_prompts, max_retention=1)
    r = compare(cfg)
    s, c = r["sync"], r["c3po"]
    assert c["rollout_s"] == pytest.approx(s["rollout_s"], rel=1e-12)
    assert c["total_s"] == pytest.approx(s["total_s"], rel=1e-12)
    assert c["trained_tokens"] == s["trained_tokens"] == c["decoded_tokens"] == 6 * 4 * 2 * 32
    assert c["steps"] == s["steps"] == 6 and c["idle_s"] == s["idle_s"] == 0 and c["mean_version_lag"] == 0
    assert r["rollout_speedup"] == pytest.approx(1.0) and r["step_speedup"] == pytest.approx(1.0)
    # A group queued behind the engine's batch holds no tokens and does not age: nothing is purged even when the
    # pool holds more samples than the engine runs (an earlier scheduler purged those, dropping their prompts).
    assert c["purge_rate"] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_heavy_tail_c3po_rollout_is_faster(seed):
    r = compare(replace(SMALL, seed=seed))
    s, c = r["sync"], r["c3po"]
    assert r["rollout_speedup"] > 1.1 and c["rollout_s_per_step"] < s["rollout_s_per_step"]
    assert c["idle_s"] < s["idle_s"]  # the gain is the tail the sync engine idles through
    assert s["decoded_tokens"] == s["trained_tokens"]  # sync wastes nothing
    assert s["trained_tokens"] <= c["trained_tokens"] < s["trained_tokens"] + 2 * r["config"]["token_budget"]


@pytest.mark.parametrize("sigma", [0, 1, 3, 100])
def test_every_sample_trained_once_purged_or_still_pooled(sigma):
    cfg = replace(SMALL, max_retention=sigma, steps=10)
    lengths, results = Lengths(cfg), []
    sync = run_sync(cfg, lengths)
    budget = sync.trained_tokens // cfg.steps
    stats, sched = run_c3po(cfg, sync.trained_tokens, budget, lengths, on_iteration=results.append)
    trained = Counter((t.prompt_id, t.sample_index) for r in results for g in r.batch for t in g)
    purged = Counter(p for r in results for p in r.purged_prompt_ids)
    state = sched.state_dict()
    pool = state["inference_pool"] + state["training_pool"]  # unfinished, or finished after the last crossing
    pooled = {g["prompt_id"] for g in pool}
    admitted = {p for p, _ in trained} | set(purged) | pooled
    assert admitted == {str(j) for j in range(len(admitted))}  # a prefix of the stream, nothing skipped
    for p in admitted:
        outcomes = [sum(trained[p, i] for i in range(cfg.group_size)), purged[p], p in pooled]
        assert outcomes in ([cfg.group_size, 0, False], [0, 1, False], [0, 0, True]), (p, outcomes)
    for r in results:
        assert r.trained_tokens >= budget  # the unbounded stream always reaches the budget
        # Not a rule under per-request retention (see the next test), but true at seed 0: no finished sample here
        # waited across an update for a sibling that had not started.
        assert max(r.version_lag) <= sigma
        for g in r.batch:
            for t in g:
                assert t.length == lengths(int(t.prompt_id))[t.sample_index]  # resumed to the exact length
                assert t.versions[-1] - t.versions[0] <= t.retention <= sigma  # the rule: <= sigma + 1 versions
    assert stats.trained_tokens == sum(r.trained_tokens for r in results)
    pool_tokens = sum(len(t["tokens"]) for g in pool for t in g["trajectories"])
    if not purged:  # nothing decoded twice: resumed requests only generate the remainder
        assert stats.decoded_tokens == stats.trained_tokens + pool_tokens
    else:
        assert stats.decoded_tokens > stats.trained_tokens + pool_tokens
    assert stats.purged_groups == sum(purged.values()) and stats.trained_groups == len(trained) // cfg.group_size


def test_retention_bounds_each_trajectory_not_its_group():
    """sigma = 1, seed 1: 15/0 decodes in versions 0 and 1 (carried once) while 15/1 waits in the engine queue
    through version 0 holding no token (it does not age), then decodes in 1 and 2 (carried once). Each trajectory
    mixes 2 = sigma + 1 versions and is trained at version 2; 15/0's two version-0 tokens have lag 2 > sigma. The
    old per-GROUP rule aged group 15 at both cuts (a sample held tokens) and purged it: 4 groups purged and 37
    trained then (purge rate 0.098, max lag 1), 3 and 36 now (0.077, max lag 2) to the same trained-token target."""
    cfg = replace(SMALL, max_retention=1, seed=1)
    lengths, results = Lengths(cfg), []
    sync = run_sync(cfg, lengths)
    stats, _ = run_c3po(cfg, sync.trained_tokens, sync.trained_tokens // cfg.steps, lengths,
                        on_iteration=results.append)
    spans = {t.uid: (sorted(set(t.versions)), t.retention) for r in results for g in r.batch for t in g}
    assert all(v[-1] - v[0] <= ret <= 1 for v, ret in spans.values())
    assert (spans["15/0"], spans["15/1"]) == (([0, 1], 1), ([1, 2], 1))
    assert [max(r.version_lag) for r in results] == [0, 1, 2, 1, 1] and results[2].version_lag[2] == 2
    assert (stats.purged_groups, stats.trained_groups) == (3, 36)


def test_version_lag_zero_iff_nothing_is_carried():
    lag0 = compare(replace(SMALL, max_retention=0))["c3po"]
    # sigma = 0 purges every trajectory cut holding tokens; a lag > 0 would need a finished sample waiting for a
    # sibling that had not started (previous test), which does not happen at seed 0
    assert lag0["mean_version_lag"] == 0 and lag0["max_version_lag"] == 0 and lag0["purge_rate"] > 0
    lag2 = compare(replace(SMALL, max_retention=2))["c3po"]
    assert 0 < lag2["mean_version_lag"] and lag2["max_version_lag"] == 2
    assert lag2["purge_rate"] < lag0["purge_rate"]  # retention trades staleness for fewer purges


def test_deterministic_given_seed_and_quantum_close_to_exact():
    assert compare(SMALL) == compare(SMALL)
    assert compare(SMALL)["sync"] != compare(replace(SMALL, seed=7))["sync"]
    exact, coarse = compare(SMALL), compare(replace(SMALL, token_quantum=4))
    assert coarse["config"]["quantum"] == 4
    assert math.isclose(coarse["rollout_speedup"], exact["rollout_speedup"], rel_tol=0.25)


def test_lengths_are_clipped_lognormal_with_the_given_median():
    cfg = SimConfig(group_size=8, max_response_length=65536, length_median=8192, length_sigma=1.0)
    lengths = Lengths(cfg)
    units = sorted(u for j in range(500) for u in lengths(j))
    assert cfg.quantum == 128 and max(units) == lengths.max_units == 512
    assert units[len(units) // 2] * 128 == pytest.approx(8192, rel=0.1)
    assert 0.005 < sum(u == 512 for u in units) / len(units) < 0.05  # P(Z > ln 8) ~ 1.9% hit the cap


def test_paper_scale_is_fast_and_cuts_the_tail():
    r = compare(SimConfig(steps=2))
    assert r["config"]["max_batch"] == 3840 and r["sync"]["trained_groups"] == 960
    assert r["rollout_speedup"] > 1.0 and r["c3po"]["idle_frac"] < r["sync"]["idle_frac"]


def test_bench_cli_tiny(tmp_path):
    path = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_c3po_sim.py"
    spec = importlib.util.spec_from_file_location("bench_c3po_sim", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    assert bench.main(["--tiny", "--length-sigma", "0", "--sweep", "none", "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "c3po_sim.json").read_text())
    assert report["preset"] == "tiny" and report["rollout_speedup"] == pytest.approx(1.0)
    assert report["config"]["prompts_per_step"] == 8 and not (tmp_path / "c3po_sim.png").exists()
    assert bench.main(["--tiny", "--steps", "2", "--sweep", "phi", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "c3po_sim.png").stat().st_size > 0

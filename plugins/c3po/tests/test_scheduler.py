"""Tests of ring_ext_c3po.scheduler (C3PO++ core): budget crossing, retention boundary, resume accounting,
validation, a hypothesis-driven simulator run to exhaustion, and restart from a JSON round-tripped state_dict."""

from __future__ import annotations

import json
import math
import random
import zlib
from collections import Counter, defaultdict
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ring_ext_c3po.rules import C3POConfig
from ring_ext_c3po.scheduler import STATE_FORMAT, C3POScheduler, GenerationRequest

SHAPE = ("group_size", "max_response_length")  # the scheduler's own arguments; the rest is rules.C3POConfig


def make(prompts, **kw) -> C3POScheduler:
    base = dict(token_budget=10, max_retention=1, pool_prompts=2, group_size=2, max_response_length=8)
    kw = {**base, **kw}
    shape = {k: kw.pop(k) for k in SHAPE}
    return C3POScheduler(C3POConfig(**kw), prompts, **shape)


def restore(s: C3POScheduler, prompts, state) -> C3POScheduler:
    return C3POScheduler.from_state_dict(s.config, prompts, state, group_size=s.group_size,
                                         max_response_length=s.max_response_length)


def by_prompt(reqs: list[GenerationRequest]) -> dict[str, list[GenerationRequest]]:
    out: dict[str, list[GenerationRequest]] = defaultdict(list)
    for r in reqs:
        out[r.prompt_id].append(r)
    return {p: sorted(rs, key=lambda r: r.sample_index) for p, rs in out.items()}


def emit(s: C3POScheduler, req: GenerationRequest, n: int, **kw) -> None:
    s.record(req.uid, list(range(n)), [-0.5] * n, **kw)


# -- budget ------------------------------------------------------------------------------------------------------
def test_budget_crossed_by_the_expected_group_and_groups_never_split():
    s = make(["a", "b", "c", "d"], token_budget=10, pool_prompts=3, group_size=2)
    r = by_prompt(s.pending_requests())
    assert sorted(r) == ["a", "b", "c"] and all(len(v) == 2 for v in r.values())
    emit(s, r["a"][0], 5, finished=True)  # 1 of 2 samples of "a": contributes nothing to C
    emit(s, r["c"][0], 7, finished=True)
    emit(s, r["c"][1], 1, finished=False)  # partial tokens never count
    assert s.metrics()["budget_used"] == 0 and not s.budget_reached
    emit(s, r["b"][0], 3, finished=True)
    emit(s, r["b"][1], 3, finished=True)  # "b" complete: C = 6 < 10
    assert s.metrics()["budget_used"] == pytest.approx(0.6) and not s.budget_reached
    assert [x.prompt_id for x in s.pending_requests()] == ["d", "d"]  # "b" left the inference pool: top-up
    assert s.record(r["a"][1].uid, [1] * 4, [-0.5] * 4, finished=True)  # "a" complete: C = 6 + 9 = 15 >= 10
    assert s.budget_reached and s.metrics()["budget_used"] == pytest.approx(1.5)  # crossing group included
    assert s.pending_requests() == []  # rollout phase over
    assert len(s.abort_in_flight()) == 3  # c/1 and d/0, d/1
    res = s.end_iteration()
    # rules.training_batch: completion order up to the crossing group ("a")
    assert [[t.prompt_id for t in g] for g in res.batch] == [["b", "b"], ["a", "a"]]
    assert [[t.sample_index for t in g] for g in res.batch] == [[0, 1], [0, 1]]
    assert (res.trained_groups, res.trained_tokens, res.carried_groups, res.purged_groups) == (2, 15, 2, 0)
    assert res.version_lag == {0: 15} and s.metrics()["budget_used"] == 0


def test_budget_boundary_is_inclusive():
    s = make(["a", "b", "c"], token_budget=6, group_size=1, pool_prompts=3)
    r = by_prompt(s.pending_requests())
    assert not s.record(r["a"][0].uid, [1] * 5, [-0.1] * 5, finished=True)
    assert not s.budget_reached
    assert s.record(r["b"][0].uid, [1], [-0.1], finished=True)  # C == Phi exactly: the crossing completion
    assert s.budget_reached
    assert not s.record(r["c"][0].uid, [1], [-0.1], finished=True)  # after the crossing: counted, never crosses again
    assert s.metrics()["budget_used"] == pytest.approx(7 / 6)


def test_crossing_fires_once_per_phase_and_restore_does_not_fire_it_again():
    s = make(["a", "b", "c", "d"], token_budget=2, group_size=1, pool_prompts=2)
    ra, rb = s.pending_requests()
    assert s.record(ra.uid, [1, 2], [-0.1] * 2, finished=True)
    s.abort_in_flight()
    state = json.loads(json.dumps(s.state_dict()))  # C = Phi, the crossing already fired
    restored = restore(s, ["a", "b", "c", "d"], state)
    assert restored.budget_reached and restored.pending_requests() == []
    restored.end_iteration()  # "b" carried with 0 tokens: it does not age
    rb2, rc = restored.pending_requests()
    assert (rb2.uid, rc.prompt_id) == (rb.uid, "c")
    assert not restored.record(rb2.uid, [1], [-0.1], finished=True)  # C = 1 < 2 in the new phase
    assert restored.record(rc.uid, [1], [-0.1], finished=True)  # the new phase's crossing fires

# -- retention -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0, 1, 2])
def test_group_survives_sigma_updates_and_is_purged_at_sigma_plus_one(sigma):
    s = make(["p", "q"], max_retention=sigma, pool_prompts=1, group_size=2, max_response_length=50)
    r = by_prompt(s.pending_requests())["p"]
    emit(s, r[0], 2, finished=True)  # finished sample: purged with its group all the same
    uids, req = [x.uid for x in r], r[1]
    for update in range(1, sigma + 2):
        emit(s, req, 1, finished=False)
        assert s.abort_in_flight() == [uids[1]]
        res = s.end_iteration()
        if update <= sigma:  # p/1's retention == update <= sigma: kept
            assert (res.carried_groups, res.purged_groups, res.purged_prompt_ids) == (1, 0, ())
            assert s.metrics()["carried_over"] == 1
            ages = [t["retention"] for t in s.state_dict()["inference_pool"][0]["trajectories"]]
            assert ages == [0, update]  # per request: the finished p/0 is not cut, so it does not age
            (req,) = s.pending_requests()
            assert req.uid == uids[1]  # pool of 1 group: "q" is not admitted while "p" is carried
        else:  # retention == sigma + 1 > sigma: purged
            assert (res.carried_groups, res.purged_groups, res.purged_prompt_ids) == (0, 1, ("p",))
    assert s.metrics()["purged"] == 1 and s.metrics()["in_flight"] == 0
    for uid in uids:
        with pytest.raises(KeyError, match="purged"):
            s.record(uid, [1], [-0.1], finished=False)
    assert {x.prompt_id for x in s.pending_requests()} == {"q"}  # "p" is dropped, not resampled


def test_retention_is_per_request_a_queued_sibling_does_not_age_its_group():
    """sigma = 0, G = 2: x/0 finishes in phase 0 and x/1 is cut before its first token. The old per-GROUP rule aged
    the group (a sample held tokens) and purged it; per request, x/1 held nothing stale, so the group is carried and
    trained in phase 1. x/0's tokens are then one version old (lag 1 > sigma): sigma bounds the versions a
    trajectory mixes, not the age of a finished sibling. y/1 is cut holding a token: purged, and y/0 with it."""
    s = make(["x", "y", "z"], token_budget=100, max_retention=0, pool_prompts=2, group_size=2)
    r = by_prompt(s.pending_requests())
    emit(s, r["x"][0], 3, finished=True)
    emit(s, r["y"][0], 2, finished=True)
    emit(s, r["y"][1], 1, finished=False)
    s.abort_in_flight()
    res = s.end_iteration()
    assert (res.carried_groups, res.purged_prompt_ids) == (1, ("y",))
    assert s.metrics()["carried_over"] == 0  # x/1 has retention 0: nothing carried across holding tokens
    reqs = by_prompt(s.pending_requests())
    assert sorted(reqs) == ["x", "z"] and [q.sample_index for q in reqs["x"]] == [1]
    emit(s, reqs["x"][0], 4, finished=True)
    s.abort_in_flight()
    res = s.end_iteration()
    assert [[t.prompt_id for t in g] for g in res.batch] == [["x", "x"]]
    assert res.policy_version == 1 and res.version_lag == {0: 4, 1: 3}
    assert [t.retention for t in res.batch[0]] == [0, 0]


# -- resume --------------------------------------------------------------------------------------------------
def test_resume_accounting_across_two_updates_ends_by_length():
    s = make(["p"], group_size=1, pool_prompts=1, max_response_length=10, max_retention=5)
    (req,) = s.pending_requests()
    assert (req.prefix_tokens, req.max_new_tokens) == ((), 10)
    s.record(req.uid, [1, 2, 3, 4], [-0.1, -0.2, -0.3, -0.4], finished=False)
    s.abort_in_flight()
    assert s.end_iteration().carried_groups == 1
    (req,) = s.pending_requests()
    assert s.pending_requests() == []  # submitted once
    assert (req.prefix_tokens, req.max_new_tokens) == ((1, 2, 3, 4), 6)
    s.record(req.uid, [5, 6], [-0.5, -0.6], finished=False)
    s.record(req.uid, [7], [-0.7], finished=False)  # two segments of one request
    s.abort_in_flight()
    s.end_iteration()
    (req,) = s.pending_requests()
    assert (req.prefix_tokens, req.max_new_tokens, s.policy_version) == ((1, 2, 3, 4, 5, 6, 7), 3, 2)
    with pytest.raises(ValueError, match="max_response_length"):
        s.record(req.uid, [8, 9, 10, 11], [-1.0] * 4, finished=False)
    s.record(req.uid, [8, 9, 10], [-0.8, -0.9, -1.0], finished=False)  # reaches max length
    assert s.abort_in_flight() == []  # finished, not in flight
    res = s.end_iteration()
    assert res.carried_groups == 0 and s.exhausted
    (t,) = res.batch[0]
    assert (t.finished, t.finish_reason) == (True, "length")
    assert t.tokens == list(range(1, 11)) and t.logprobs == pytest.approx([-x / 10 for x in range(1, 11)])
    assert t.versions == [0] * 4 + [1] * 3 + [2] * 3 and t.retention == 2  # cut twice holding tokens
    assert res.policy_version == 2 and res.version_lag == {0: 3, 1: 3, 2: 4}


# -- validation ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, bad", [("token_budget", 0), ("max_retention", -1), ("pool_prompts", 0),
                                       ("group_size", 0), ("max_response_length", 0), ("token_budget", 2.5),
                                       ("pool_prompts", True), ("group_size", True), ("max_response_length", 1.0)])
def test_config_errors_name_the_field(name, bad):
    with pytest.raises(ValueError, match=name):
        make(["a"], **{name: bad})


def test_config_must_be_the_rules_config():
    with pytest.raises(TypeError, match="rules.C3POConfig"):
        C3POScheduler({"token_budget": 4}, ["a"], group_size=1, max_response_length=4)  # type: ignore[arg-type]


def test_record_errors_name_the_uid():
    s = make(["a", "b"], group_size=1, max_response_length=4)
    ra, rb = s.pending_requests()
    for toks, lps in [([1, 2], [-0.1]), ([1], [math.nan]), ([1], [-math.inf]), ([-1], [-0.1]), ([1] * 5, [-0.1] * 5)]:
        with pytest.raises(ValueError, match=ra.uid):
            s.record(ra.uid, toks, lps, finished=False)
    with pytest.raises(ValueError, match="finish_reason"):
        s.record(ra.uid, [1], [-0.1], finished=False, finish_reason="stop")
    assert s.pending_requests() == []  # a rejected record changed nothing
    s.record(ra.uid, [1], [-0.1], finished=True)
    with pytest.raises(ValueError, match=f"{ra.uid}.*finished"):
        s.record(ra.uid, [1], [-0.1], finished=False)
    with pytest.raises(KeyError, match="nope"):
        s.record("nope", [], [], finished=False)
    with pytest.raises(RuntimeError, match="abort_in_flight"):
        s.end_iteration()
    with pytest.raises(RuntimeError, match="abort_in_flight"):
        s.state_dict()
    s.abort_in_flight()
    with pytest.raises(ValueError, match=f"{rb.uid}.*no request in flight"):
        s.record(rb.uid, [1], [-0.1], finished=False)


def test_restore_rejects_other_config_and_other_stream():
    s = make(["a", "b", "c"])
    s.pending_requests()
    s.abort_in_flight()
    state = s.state_dict()
    assert state["format"] == STATE_FORMAT == 2
    shape = dict(group_size=2, max_response_length=8)
    with pytest.raises(ValueError, match="pool_prompts: saved 2, given 3"):
        C3POScheduler.from_state_dict(replace(s.config, pool_prompts=3), ["a", "b", "c"], state, **shape)
    with pytest.raises(ValueError, match="stall_timeout_s: saved 600.0, given 5"):
        C3POScheduler.from_state_dict(replace(s.config, stall_timeout_s=5), ["a", "b", "c"], state, **shape)
    for name, value in [("group_size", 3), ("max_response_length", 9)]:
        with pytest.raises(ValueError, match=f"{name}: saved {shape[name]}, given {value}"):
            C3POScheduler.from_state_dict(s.config, ["a", "b", "c"], state, **{**shape, name: value})
    with pytest.raises(ValueError, match="position 1"):
        C3POScheduler.from_state_dict(s.config, ["a", "x", "c"], state, **shape)
    with pytest.raises(ValueError, match="1 prompts"):
        C3POScheduler.from_state_dict(s.config, ["a"], state, **shape)
    with pytest.raises(ValueError, match="format 1"):
        C3POScheduler.from_state_dict(s.config, ["a", "b", "c"], {**state, "format": 1}, **shape)
    with pytest.raises(ValueError, match="saved C = 3"):
        C3POScheduler.from_state_dict(s.config, ["a", "b", "c"], {**state, "budget_tokens": 3}, **shape)


# -- simulator -----------------------------------------------------------------------------------------------
def token(pid: str, s: int, pos: int) -> int:
    return zlib.crc32(f"{pid}|{s}|{pos}".encode()) % 1000


def logprob(pid: str, s: int, pos: int) -> float:
    return -(token(pid, s, pos) % 97 + 1) / 8


def simulate(s: C3POScheduler, target, chunk, results: list, stop=None, admitted=None, n_prompts=None) -> bool:
    """Deterministic engine: sample (pid, i) ends (EOS) after target(pid, i) tokens (length cap when that is the max);
    each round every in-flight request decodes chunk(version, uid) tokens; once the budget is reached the engine is
    aborted and each remaining request returns a partial segment of half that. Stateless between iterations, so a
    scheduler restored from state_dict() continues exactly. Returns False when `stop(s)` fired (after an abort).
    `admitted` collects prompt -> version of its first request; with `n_prompts` the pool top-up is checked too."""
    c = s.config
    max_len, phi, omega, sigma = s.max_response_length, c.token_budget, c.pool_prompts, c.max_retention
    admitted = {} if admitted is None else admitted
    finished, left = Counter(), set()  # prompt -> finished samples; prompts that left the inference pool
    completed: list[str] = []  # prompts in the order their groups completed, not yet trained
    while not s.exhausted:
        carried = len(completed)  # groups the last iteration left over: trained first in this one
        assert s.policy_version < 500, "no progress"
        version, running = s.policy_version, {}
        while not s.budget_reached:
            for r in s.pending_requests():
                assert r.uid not in running and r.max_new_tokens == max_len - len(r.prefix_tokens) > 0
                running[r.uid] = [r, 0]
                admitted.setdefault(r.prompt_id, version)
            if n_prompts is not None:  # a run from the start: the inference pool is topped up to omega groups
                live = set(admitted) - left
                assert len(live) == omega or (len(live) < omega and len(admitted) == n_prompts)
            if not running:
                break  # prompts exhausted and nothing unfinished
            for uid, entry in list(running.items()):
                r, done = entry
                k = chunk(version, uid) // (2 if s.budget_reached else 1)
                pos, end = len(r.prefix_tokens) + done, target(r.prompt_id, r.sample_index)
                n = min(k, end - pos)
                assert done + n <= r.max_new_tokens
                before = s.metrics()["budget_used"]
                crossed = s.record(uid, [token(r.prompt_id, r.sample_index, p) for p in range(pos, pos + n)],
                                   [logprob(r.prompt_id, r.sample_index, p) for p in range(pos, pos + n)],
                                   finished=pos + n == end < max_len)
                assert s.budget_reached == (s.metrics()["budget_used"] >= 1)  # C >= Phi, inclusive
                assert crossed == (s.metrics()["budget_used"] >= 1 > before)  # True exactly at the crossing
                if crossed:  # the record that completed a group
                    assert pos + n == end
                entry[1] += n
                if pos + n == end:
                    del running[uid]
                    finished[r.prompt_id] += 1
                    if finished[r.prompt_id] == s.group_size:
                        left.add(r.prompt_id)
                        completed.append(r.prompt_id)
            if stop is not None and stop(s):
                s.abort_in_flight()
                return False
        if s.budget_reached:
            assert s.pending_requests() == []
        assert sorted(s.abort_in_flight()) == sorted(running)
        res = s.end_iteration()
        left.update(res.purged_prompt_ids)
        if n_prompts is not None:  # a request ages only while it holds tokens: purged after >= sigma + 1 updates
            assert all(res.policy_version - admitted[p] >= sigma for p in res.purged_prompt_ids)
            # rules.training_batch: the completed groups in completion order, up to the one that crossed Phi
            trained = [g[0].prompt_id for g in res.batch]
            assert trained == completed[:len(trained)] and len(trained) >= carried  # the left-over ones all first
            tokens = [sum(t.length for t in g) for g in res.batch]
            if len(trained) > carried and sum(tokens) >= phi:
                assert sum(tokens[:-1]) < phi  # nothing past the crossing group: later ones wait a step
            del completed[:len(trained)]
            for group in res.batch:  # the sample that completed the group: its version span is <= sigma; a group that
                last = max(group, key=lambda t: t.versions[-1])  # completed after the crossing waited one more step
                waited = res.policy_version - last.versions[-1]
                assert waited in (0, 1) and res.policy_version - last.versions[0] <= sigma + waited
        if res.trained_tokens < phi:  # phase ended by draining the pool: nothing left behind
            assert res.carried_groups == res.purged_groups == 0
        results.append(res)
    return True


def check_run(s: C3POScheduler, prompts: list[str], target, results) -> None:
    trained, purged, sigma, max_len = Counter(), Counter(), s.config.max_retention, s.max_response_length
    for res in results:
        purged.update(res.purged_prompt_ids)
        assert res.trained_tokens == sum(t.length for g in res.batch for t in g) == sum(res.version_lag.values())
        for group in res.batch:
            trained[group[0].prompt_id] += 1
            assert [t.sample_index for t in group] == list(range(s.group_size))
            assert {t.prompt_id for t in group} == {group[0].prompt_id}
            for t in group:
                end = target(t.prompt_id, t.sample_index)
                assert t.length == len(t.logprobs) == len(t.versions) == end <= max_len
                assert t.tokens == [token(t.prompt_id, t.sample_index, p) for p in range(end)]
                assert t.logprobs == [logprob(t.prompt_id, t.sample_index, p) for p in range(end)]
                assert t.versions == sorted(t.versions) and all(v <= res.policy_version for v in t.versions)
                # staleness bound, per request: every version boundary inside the trajectory is a cut it was
                # carried across holding tokens, so it mixes at most retention + 1 <= sigma + 1 versions (the
                # old per-group rule bounded the lag of every trained token by sigma; a finished sample whose
                # sibling waits with no token now does not age, see the per-request test above)
                assert t.versions[-1] - t.versions[0] <= t.retention <= sigma
                assert t.finished and t.finish_reason == ("length" if end == max_len else "stop")
    for p in prompts:
        assert (trained[p], purged[p]) in [(1, 0), (0, 1)], p
    assert set(trained) | set(purged) == set(prompts)


@st.composite
def scenarios(draw):
    config = C3POConfig(token_budget=draw(st.integers(1, 16)), max_retention=draw(st.integers(0, 2)),
                        pool_prompts=draw(st.integers(1, 3)))
    shape = dict(group_size=draw(st.integers(1, 3)), max_response_length=draw(st.integers(1, 8)))
    n = draw(st.integers(0, 8))
    lengths = draw(st.lists(st.lists(st.integers(1, shape["max_response_length"]), min_size=shape["group_size"],
                                     max_size=shape["group_size"]), min_size=n, max_size=n))
    steps = draw(st.lists(st.integers(1, 3), min_size=1, max_size=6))
    return config, shape, lengths, steps


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_simulated_runs_train_or_purge_every_prompt_exactly_once(scenario):
    config, shape, lengths, steps = scenario
    prompts = [f"p{i}" for i in range(len(lengths))]
    target = lambda pid, i: lengths[int(pid[1:])][i]  # noqa: E731
    chunk = lambda version, uid: steps[(version + zlib.crc32(uid.encode())) % len(steps)]  # noqa: E731
    s, results = C3POScheduler(config, prompts, **shape), []
    assert simulate(s, target, chunk, results, n_prompts=len(prompts))
    check_run(s, prompts, target, results)
    m = s.metrics()
    assert m["tokens_trained"] == sum(r.trained_tokens for r in results) and m["in_flight"] == 0
    assert m["completed_trajectories"] == s.group_size * sum(r.trained_groups for r in results)


def trained_multiset(results) -> Counter:
    return Counter((t.prompt_id, t.sample_index, tuple(t.tokens), tuple(t.logprobs), tuple(t.versions))
                   for r in results for g in r.batch for t in g)


def test_restart_from_json_state_matches_uninterrupted_run():
    rng = random.Random(1)  # a seed where the snapshot's C, retentions and training pool all change the outcome
    config = C3POConfig(token_budget=30, max_retention=1, pool_prompts=4)
    shape = dict(group_size=2, max_response_length=10)
    prompts = [f"q{i}" for i in range(16)]
    lengths = {(p, i): rng.randint(1, 10) for p in prompts for i in range(2)}
    steps = [rng.randint(1, 4) for _ in range(17)]
    target = lambda pid, i: lengths[pid, i]  # noqa: E731
    chunk = lambda version, uid: steps[(7 * version + zlib.crc32(uid.encode())) % len(steps)]  # noqa: E731

    full: list = []
    s = C3POScheduler(config, iter(prompts), **shape)
    assert simulate(s, target, chunk, full)
    check_run(s, prompts, target, full)

    first: list = []
    s = C3POScheduler(config, iter(prompts), **shape)
    snapshot = lambda s: s.policy_version == 2 and 0 < s.metrics()["budget_used"] < 1  # noqa: E731  (mid-iteration)
    assert not simulate(s, target, chunk, first, stop=snapshot)
    m = s.metrics()
    assert m["carried_over"] > 0 and m["in_flight"] > 0 and 0 < m["budget_used"] < 1  # a state worth restoring
    state = json.loads(json.dumps(s.state_dict()))
    del s  # as a new process would: only the config, the prompt stream and the JSON state
    rest: list = []
    restored = C3POScheduler.from_state_dict(config, iter(prompts), state, **shape)
    assert simulate(restored, target, chunk, rest)
    assert restored.metrics()["tokens_trained"] == sum(r.trained_tokens for r in full)
    assert trained_multiset(first + rest) == trained_multiset(full)
    assert [r.purged_prompt_ids for r in first + rest] == [r.purged_prompt_ids for r in full]
    assert any(len(set(t.versions)) > 1 for r in full for g in r.batch for t in g)  # resumes did happen

"""Tests of ring_ext_c3po.scheduler (C3PO++ core): budget crossing, retention boundary, resume accounting,
validation, a hypothesis-driven simulator run to exhaustion, and restart from a JSON round-tripped state_dict."""

from __future__ import annotations

import json
import math
import random
import zlib
from collections import Counter, defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ring_ext_c3po.scheduler import C3POConfig, C3POScheduler, GenerationRequest


def cfg(**kw) -> C3POConfig:
    base = dict(token_budget=10, max_retention=1, pool_size=2, group_size=2, max_response_length=8)
    return C3POConfig(**{**base, **kw})


def by_prompt(reqs: list[GenerationRequest]) -> dict[str, list[GenerationRequest]]:
    out: dict[str, list[GenerationRequest]] = defaultdict(list)
    for r in reqs:
        out[r.prompt_id].append(r)
    return {p: sorted(rs, key=lambda r: r.sample_index) for p, rs in out.items()}


def emit(s: C3POScheduler, req: GenerationRequest, n: int, **kw) -> None:
    s.record(req.uid, list(range(n)), [-0.5] * n, **kw)


# -- budget ------------------------------------------------------------------------------------------------------
def test_budget_crossed_by_the_expected_group_and_groups_never_split():
    s = C3POScheduler(cfg(token_budget=10, pool_size=3, group_size=2), ["a", "b", "c", "d"])
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
    emit(s, r["a"][1], 4, finished=True)  # "a" complete: C = 6 + 9 = 15 >= 10, crossing group included
    assert s.budget_reached and s.metrics()["budget_used"] == pytest.approx(1.5)
    assert s.pending_requests() == []  # rollout phase over
    assert len(s.abort_in_flight()) == 3  # c/1 and d/0, d/1
    res = s.end_iteration()
    assert [[t.prompt_id for t in g] for g in res.batch] == [["b", "b"], ["a", "a"]]
    assert [[t.sample_index for t in g] for g in res.batch] == [[0, 1], [0, 1]]
    assert (res.trained_groups, res.trained_tokens, res.carried_groups, res.purged_groups) == (2, 15, 2, 0)
    assert res.version_lag == {0: 15} and s.metrics()["budget_used"] == 0


def test_budget_boundary_is_inclusive():
    s = C3POScheduler(cfg(token_budget=6, group_size=1, pool_size=2), ["a", "b"])
    r = by_prompt(s.pending_requests())
    emit(s, r["a"][0], 5, finished=True)
    assert not s.budget_reached
    emit(s, r["b"][0], 1, finished=True)  # C == Phi exactly
    assert s.budget_reached


# -- retention -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0, 1, 2])
def test_group_survives_sigma_updates_and_is_purged_at_sigma_plus_one(sigma):
    s = C3POScheduler(cfg(max_retention=sigma, pool_size=1, group_size=2, max_response_length=50), ["p", "q"])
    r = by_prompt(s.pending_requests())["p"]
    emit(s, r[0], 2, finished=True)  # finished sample: purged with its group all the same
    uids, req = [x.uid for x in r], r[1]
    for update in range(1, sigma + 2):
        emit(s, req, 1, finished=False)
        assert s.abort_in_flight() == [uids[1]]
        res = s.end_iteration()
        if update <= sigma:  # retention == update <= sigma: kept
            assert (res.carried_groups, res.purged_groups, res.purged_prompt_ids) == (1, 0, ())
            assert s.metrics()["carried_over"] == 1
            (req,) = s.pending_requests()
            assert req.uid == uids[1]  # pool of 1 group: "q" is not admitted while "p" is carried
        else:  # retention == sigma + 1 > sigma: purged
            assert (res.carried_groups, res.purged_groups, res.purged_prompt_ids) == (0, 1, ("p",))
    assert s.metrics()["purged"] == 1 and s.metrics()["in_flight"] == 0
    for uid in uids:
        with pytest.raises(KeyError, match="purged"):
            s.record(uid, [1], [-0.1], finished=False)
    assert {x.prompt_id for x in s.pending_requests()} == {"q"}  # "p" is dropped, not resampled


# -- resume --------------------------------------------------------------------------------------------------
def test_resume_accounting_across_two_updates_ends_by_length():
    s = C3POScheduler(cfg(group_size=1, pool_size=1, max_response_length=10, max_retention=5), ["p"])
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
    assert t.versions == [0] * 4 + [1] * 3 + [2] * 3
    assert res.policy_version == 2 and res.version_lag == {0: 3, 1: 3, 2: 4}


# -- validation ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, bad", [("token_budget", 0), ("max_retention", -1), ("pool_size", 0),
                                       ("group_size", 0), ("max_response_length", 0), ("token_budget", 2.5),
                                       ("pool_size", True)])
def test_config_errors_name_the_field(name, bad):
    with pytest.raises(ValueError, match=name):
        cfg(**{name: bad})


def test_record_errors_name_the_uid():
    s = C3POScheduler(cfg(group_size=1, max_response_length=4), ["a", "b"])
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
    s = C3POScheduler(cfg(), ["a", "b", "c"])
    s.pending_requests()
    s.abort_in_flight()
    state = s.state_dict()
    with pytest.raises(ValueError, match="pool_size: saved 2, given 3"):
        C3POScheduler.from_state_dict(cfg(pool_size=3), ["a", "b", "c"], state)
    with pytest.raises(ValueError, match="position 1"):
        C3POScheduler.from_state_dict(cfg(), ["a", "x", "c"], state)
    with pytest.raises(ValueError, match="1 prompts"):
        C3POScheduler.from_state_dict(cfg(), ["a"], state)


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
    max_len, phi, omega, sigma = c.max_response_length, c.token_budget, c.pool_size, c.max_retention
    admitted = {} if admitted is None else admitted
    finished, left = Counter(), set()  # prompt -> finished samples; prompts that left the inference pool
    while not s.exhausted:
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
                s.record(uid, [token(r.prompt_id, r.sample_index, p) for p in range(pos, pos + n)],
                         [logprob(r.prompt_id, r.sample_index, p) for p in range(pos, pos + n)],
                         finished=pos + n == end < max_len)
                assert s.budget_reached == (s.metrics()["budget_used"] >= 1)  # C >= Phi, inclusive
                if s.metrics()["budget_used"] >= 1 > before:  # crossing: the record that completed a group
                    assert pos + n == end
                entry[1] += n
                if pos + n == end:
                    del running[uid]
                    finished[r.prompt_id] += 1
                    if finished[r.prompt_id] == c.group_size:
                        left.add(r.prompt_id)
            if stop is not None and stop(s):
                s.abort_in_flight()
                return False
        if s.budget_reached:
            assert s.pending_requests() == []
        assert sorted(s.abort_in_flight()) == sorted(running)
        res = s.end_iteration()
        left.update(res.purged_prompt_ids)
        if n_prompts is not None:  # a group ages only once it holds tokens, so no trained token is staler than sigma
            assert all(res.policy_version - admitted[p] >= sigma for p in res.purged_prompt_ids)
            assert max(res.version_lag, default=0) <= sigma
        if res.trained_tokens < phi:  # phase ended by draining the pool: nothing left behind
            assert res.carried_groups == res.purged_groups == 0
        results.append(res)
    return True


def check_run(config: C3POConfig, prompts: list[str], target, results) -> None:
    trained, purged = Counter(), Counter()
    for res in results:
        purged.update(res.purged_prompt_ids)
        assert res.trained_tokens == sum(t.length for g in res.batch for t in g) == sum(res.version_lag.values())
        assert max(res.version_lag, default=0) <= config.max_retention  # staleness bound
        for group in res.batch:
            trained[group[0].prompt_id] += 1
            assert [t.sample_index for t in group] == list(range(config.group_size))
            assert {t.prompt_id for t in group} == {group[0].prompt_id}
            for t in group:
                end = target(t.prompt_id, t.sample_index)
                assert t.length == len(t.logprobs) == len(t.versions) == end <= config.max_response_length
                assert t.tokens == [token(t.prompt_id, t.sample_index, p) for p in range(end)]
                assert t.logprobs == [logprob(t.prompt_id, t.sample_index, p) for p in range(end)]
                assert t.versions == sorted(t.versions) and all(v <= res.policy_version for v in t.versions)
                assert t.finished and t.finish_reason == ("length" if end == config.max_response_length else "stop")
    for p in prompts:
        assert (trained[p], purged[p]) in [(1, 0), (0, 1)], p
    assert set(trained) | set(purged) == set(prompts)


@st.composite
def scenarios(draw):
    config = C3POConfig(token_budget=draw(st.integers(1, 16)), max_retention=draw(st.integers(0, 2)),
                        pool_size=draw(st.integers(1, 3)), group_size=draw(st.integers(1, 3)),
                        max_response_length=draw(st.integers(1, 8)))
    n = draw(st.integers(0, 8))
    lengths = draw(st.lists(st.lists(st.integers(1, config.max_response_length), min_size=config.group_size,
                                     max_size=config.group_size), min_size=n, max_size=n))
    steps = draw(st.lists(st.integers(1, 3), min_size=1, max_size=6))
    return config, lengths, steps


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_simulated_runs_train_or_purge_every_prompt_exactly_once(scenario):
    config, lengths, steps = scenario
    prompts = [f"p{i}" for i in range(len(lengths))]
    target = lambda pid, i: lengths[int(pid[1:])][i]  # noqa: E731
    chunk = lambda version, uid: steps[(version + zlib.crc32(uid.encode())) % len(steps)]  # noqa: E731
    s, results = C3POScheduler(config, prompts), []
    assert simulate(s, target, chunk, results, n_prompts=len(prompts))
    check_run(config, prompts, target, results)
    m = s.metrics()
    assert m["tokens_trained"] == sum(r.trained_tokens for r in results) and m["in_flight"] == 0
    assert m["completed_trajectories"] == config.group_size * sum(r.trained_groups for r in results)


def trained_multiset(results) -> Counter:
    return Counter((t.prompt_id, t.sample_index, tuple(t.tokens), tuple(t.logprobs), tuple(t.versions))
                   for r in results for g in r.batch for t in g)


def test_restart_from_json_state_matches_uninterrupted_run():
    rng = random.Random(1)  # a seed where the snapshot's C, retentions and training pool all change the outcome
    config = C3POConfig(token_budget=30, max_retention=1, pool_size=4, group_size=2, max_response_length=10)
    prompts = [f"q{i}" for i in range(16)]
    lengths = {(p, i): rng.randint(1, 10) for p in prompts for i in range(2)}
    steps = [rng.randint(1, 4) for _ in range(17)]
    target = lambda pid, i: lengths[pid, i]  # noqa: E731
    chunk = lambda version, uid: steps[(7 * version + zlib.crc32(uid.encode())) % len(steps)]  # noqa: E731

    full: list = []
    assert simulate(C3POScheduler(config, iter(prompts)), target, chunk, full)
    check_run(config, prompts, target, full)

    first: list = []
    s = C3POScheduler(config, iter(prompts))
    snapshot = lambda s: s.policy_version == 2 and 0 < s.metrics()["budget_used"] < 1  # noqa: E731  (mid-iteration)
    assert not simulate(s, target, chunk, first, stop=snapshot)
    m = s.metrics()
    assert m["carried_over"] > 0 and m["in_flight"] > 0 and 0 < m["budget_used"] < 1  # a state worth restoring
    state = json.loads(json.dumps(s.state_dict()))
    del s  # as a new process would: only the config, the prompt stream and the JSON state
    rest: list = []
    restored = C3POScheduler.from_state_dict(config, iter(prompts), state)
    assert simulate(restored, target, chunk, rest)
    assert restored.metrics()["tokens_trained"] == sum(r.trained_tokens for r in full)
    assert trained_multiset(first + rest) == trained_multiset(full)
    assert [r.purged_prompt_ids for r in first + rest] == [r.purged_prompt_ids for r in full]
    assert any(len(set(t.versions)) > 1 for r in full for g in r.batch for t in g)  # resumes did happen

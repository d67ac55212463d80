"""benchmarks/bench_c3po_vllm.py without running verl: seeded lengths, equal-footing overrides, the summary's ratios."""

from __future__ import annotations

import json

import hashlib
import math
import statistics
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_c3po_vllm as bench  # noqa: E402
import c3po_length_loop as loop  # noqa: E402

SETUP = bench.Setup(steps=5, batch=4, n=2, median=24.0, max_len=256, engine_seqs=8, retention=1)


def _draws(sigma: float, rows: int = 4000, max_len: int = 10_000) -> list[int]:
    return [loop.draw_length(7, row, 0, 24.0, sigma, max_len) for row in range(rows)]


def _quantile(xs: list[int], q: float) -> float:
    return sorted(xs)[int(q * (len(xs) - 1))]


def test_length_is_a_function_of_seed_row_and_session() -> None:
    args = (24.0, 1.0, 256)
    assert [loop.draw_length(3, 11, 1, *args) for _ in range(3)] == [loop.draw_length(3, 11, 1, *args)] * 3
    sessions = {loop.draw_length(3, 11, s, *args) for s in range(8)}
    assert len(sessions) > 4  # the samples of one group decode different lengths
    assert loop.draw_seed(3, 11, 0) != loop.draw_seed(3, 11, 1) != loop.draw_seed(4, 11, 1)
    assert loop.draw_seed(0, 1, 23) != loop.draw_seed(0, 12, 3)  # no "1/23" vs "12/3" collision


def test_the_seed_is_stable_across_processes() -> None:
    # Ray workers of different runs must draw alike: no per-process salted hash()
    assert loop.draw_seed(0, 0, 0) == int.from_bytes(hashlib.blake2b(b"0/0/0", digest_size=8).digest(), "little")


def test_row_comes_from_verl_index_or_extra_info() -> None:
    torch = pytest.importorskip("torch")
    assert loop.row_of({"index": torch.tensor(5)}) == 5
    assert loop.row_of({"extra_info": {"index": 9}}) == 9
    with pytest.raises(KeyError, match="index"):
        loop.row_of({"raw_prompt": []})


@pytest.mark.parametrize("dist", ["heavy", "light"])
def test_draws_follow_the_median(dist: str) -> None:
    draws = _draws(loop.DISTS[dist])
    assert abs(statistics.median(draws) - 24) <= 1.5


def test_heavy_has_the_longer_tail() -> None:
    heavy, light = _draws(loop.DISTS["heavy"]), _draws(loop.DISTS["light"])
    tail = {name: _quantile(d, 0.9) / statistics.median(d) for name, d in (("heavy", heavy), ("light", light))}
    assert tail["heavy"] == pytest.approx(math.exp(1.2816), rel=0.1)  # p90/median of LogNormal: e^{1.2816 sigma}
    assert tail["light"] == pytest.approx(math.exp(1.2816 * 0.25), rel=0.1)
    assert tail["heavy"] > 2 * tail["light"]


def test_draws_respect_the_clip() -> None:
    draws = [loop.draw_length(0, r, s, 24.0, 1.0, 64) for r in range(500) for s in range(2)]
    assert min(draws) >= 1 and max(draws) == 64


@pytest.mark.parametrize(("sigma", "max_len"), [(1.0, 256), (0.25, 256), (1.0, 32)])
def test_expected_length_matches_the_draws(sigma: float, max_len: int) -> None:
    draws = [loop.draw_length(1, r, s, 24.0, sigma, max_len) for r in range(10_000) for s in range(2)]
    assert loop.expected_length(24.0, sigma, max_len) == pytest.approx(statistics.fmean(draws), rel=0.02)
    unclipped = 24.0 * math.exp(sigma**2 / 2)
    assert loop.expected_length(24.0, sigma, 10**5) == pytest.approx(unclipped, rel=1e-3)


def _overrides(mode: str, sigma: float = 1.0) -> list[str]:
    return bench.mode_overrides(mode, SETUP, sigma, Path("/tmp/run"), Path("/tmp/run/loops.yaml"))


def test_modes_share_engine_batch_and_groups_in_flight() -> None:
    seen = {mode: bench.concurrency(mode, _overrides(mode)) for mode in bench.MODES}
    assert {c["engine_seqs"] for c in seen.values()} == {SETUP.batch * SETUP.n}
    # admitted groups (decoding or queued behind the engine batch): the two partial-rollout modes alike, 2B with w = 1
    assert seen["c3po"]["groups_in_flight"] == seen["colocate_async"]["groups_in_flight"] == 2 * SETUP.batch
    assert seen["sync"]["groups_in_flight"] == SETUP.batch


def test_modes_differ_only_in_their_own_knobs() -> None:
    sets = {mode: set(_overrides(mode)) for mode in bench.MODES}
    shared = set.intersection(*sets.values())
    for needed in ("actor_rollout_ref.actor.policy_loss.loss_mode=vanilla",
                   "actor_rollout_ref.actor.use_dynamic_bsz=true", "data.train_batch_size=4",
                   "actor_rollout_ref.actor.ppo_mini_batch_size=4",
                   "actor_rollout_ref.rollout.max_num_seqs=8", "data.max_response_length=256"):
        assert needed in shared
    own = {mode: {o.split("=")[0] for o in sets[mode] - shared} for mode in bench.MODES}
    poll = {"trainer.v1.sampler.custom_sampler.path", "trainer.v1.sampler.custom_sampler.name"}
    assert own["sync"] == {"ring1t_loop", "trainer.v1.trainer_mode", *poll}
    assert own["colocate_async"] == {"ring1t_loop", "trainer.v1.trainer_mode", *poll,
                                     "trainer.v1.colocate_async.num_warmup_batches",
                                     "trainer.v1.sampler.max_off_policy_threshold",
                                     "trainer.v1.sampler.max_off_policy_strategy"}
    assert "trainer.v1.sampler.max_off_policy_threshold=2" in sets["colocate_async"]  # sigma 1 + 1
    # verl's own buffers with C3PO++'s poll interval (verl hard-wires 2 s), through verl's custom-sampler hook
    assert "trainer.v1.sampler.custom_sampler.name=FastPollReplayBuffer" in sets["sync"]
    assert "trainer.v1.sampler.custom_sampler.name=FastPollReplayBufferAsync" in sets["colocate_async"]
    assert own["c3po"] == own["c3po_keep"] == {
        "trainer.v1.trainer_mode", "trainer.v1.c3po.token_budget", "trainer.v1.c3po.pool_prompts",
        "trainer.v1.c3po.max_retention", "trainer.v1.c3po.carry"}
    assert own["c3po_adaptive"] == own["c3po"] | {"trainer.v1.c3po.adaptive_cut"}
    assert own["c3po_admit"] == own["c3po_adaptive"] | {"trainer.v1.c3po.admission"}
    assert own["c3po_complete"] == own["c3po"] | {"trainer.v1.c3po.admission"}
    assert "trainer.v1.c3po.admission=completion" in sets["c3po_admit"] & sets["c3po_complete"]
    assert "trainer.v1.c3po.carry=keep" in sets["c3po_keep"] and "trainer.v1.c3po.carry=abort" in sets["c3po"]
    assert {"trainer.v1.c3po.carry=abort", "trainer.v1.c3po.adaptive_cut=true"} <= sets["c3po_adaptive"]
    assert "actor_rollout_ref.rollout.enable_prefix_caching=false" in shared  # keep needs it: the same for all


def test_the_fast_poll_samplers_are_verls_buffers_polling_as_often_as_c3po() -> None:
    sys.path.insert(0, str(Path(bench.__file__).parent))
    import fast_poll_sampler as fast
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync

    from ring_ext_c3po.rules import C3POConfig

    assert fast.POLL_INTERVAL_S == C3POConfig(token_budget=1).poll_interval_s == 0.05
    kwargs = dict(trainer_mode="sync", trainer_config={}, max_off_policy_threshold=None,
                  max_off_policy_strategy="drop", sampler_kwargs={}, poll_interval=2.0)
    assert fast.FastPollReplayBuffer(**kwargs).poll_interval == 0.05  # verl's 2 s default replaced
    assert issubclass(fast.FastPollReplayBuffer, ReplayBuffer)
    assert issubclass(fast.FastPollReplayBufferAsync, ReplayBufferAsync)


@pytest.mark.parametrize("dist", ["heavy", "light"])
def test_c3po_budget_is_the_sync_batch_expected_tokens(dist: str) -> None:
    sigma = loop.DISTS[dist]
    expected = round(SETUP.batch * SETUP.n * loop.expected_length(SETUP.median, sigma, SETUP.max_len))
    assert f"trainer.v1.c3po.token_budget={expected}" in _overrides("c3po", sigma)
    assert bench.token_budget(SETUP, sigma) == expected


def test_overrides_compose_with_verl_config_and_no_unknown_key() -> None:
    """Each mode's overrides through Hydra with verl's real config and the recipe (no run, no model build)."""
    from ring_ext.config_check import unknown_keys
    from ring_ext.verl_config import compose_verl

    for mode in bench.MODES:
        cfg = compose_verl(_overrides(mode))
        assert unknown_keys(cfg) == [], mode
        assert cfg.trainer.v1.trainer_mode == ("c3po" if mode in bench.C3PO_MODES else mode)
        assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "vanilla"
        assert cfg.actor_rollout_ref.actor.use_dynamic_bsz is True
        # the same rollout work: engine log-probs on and verl's in-process weight push in every colocated mode
        assert cfg.actor_rollout_ref.rollout.calculate_log_probs is True
        assert cfg.actor_rollout_ref.rollout.checkpoint_engine.backend == "naive"
        assert cfg.actor_rollout_ref.rollout.max_num_seqs == 8 and cfg.actor_rollout_ref.rollout.n == 2
        assert cfg.data.train_batch_size == 4 and cfg.data.max_response_length == 256
        assert cfg.data.max_prompt_length == bench.PROMPT_MAX
        assert OmegaConf.select(cfg, "actor_rollout_ref.rollout.agent.default_agent_loop") == bench.LOOP_NAME
    c3po = compose_verl(_overrides("c3po")).trainer.v1.c3po
    assert (c3po.token_budget, c3po.pool_prompts, c3po.max_retention) == (bench.token_budget(SETUP, 1.0), 8, 1)
    sampler = compose_verl(_overrides("colocate_async")).trainer.v1
    assert sampler.sampler.max_off_policy_threshold == 2 and sampler.colocate_async.num_warmup_batches == 1.0


def _step(gen: float, step: float, tokens: float, **extra: float) -> dict:
    return {"timing_s/gen": gen, "timing_s/step": step, "response_length/mean": tokens / 8,
            "c3po/tokens_trained": tokens, **extra}


def test_summary_skips_warmup_and_computes_ratios() -> None:
    c3po_extra = {"c3po/budget_used": 1.1, "c3po/version_lag/mean": 0.5, "c3po/version_lag/max": 1,
                  "c3po/groups_purged": 1, "c3po/groups_trained": 4}
    sync = [_step(100, 200, 400)] + [_step(4, 8, 400)] * 4  # a slow first step, left out
    asy = [_step(100, 200, 400)] + [_step(3, 7, 200, **{"training/off_policy/evicted_samples": 1})] * 4
    c3po = [_step(100, 200, 400, **c3po_extra)] + [_step(2, 5, 500, **c3po_extra)] * 4
    sums = {m: bench.summarize(m, s, SETUP, warmup=1) for m, s in
            (("sync", sync), ("colocate_async", asy), ("c3po", c3po))}
    assert sums["sync"]["gen_s_per_1k_tokens"] == pytest.approx(1e3 * 16 / 1600)
    assert sums["sync"]["tokens_per_step"] == [400.0] * 4  # response_length/mean x B x n
    assert sums["c3po"]["step_s_per_1k_tokens"] == pytest.approx(1e3 * 20 / 2000)
    r = bench.ratios(sums)
    assert r["sync/c3po"]["rollout"] == pytest.approx((4 / 400) / (2 / 500))
    assert r["sync/c3po"]["step"] == pytest.approx((8 / 400) / (5 / 500))
    assert r["colocate_async/c3po"]["rollout"] == pytest.approx((3 / 200) / (2 / 500))
    assert sums["c3po"]["purge_rate"] == pytest.approx(4 / 20)
    assert sums["c3po"]["budget_used_median"] == pytest.approx(1.1) and sums["c3po"]["version_lag_max"] == 1
    assert sums["colocate_async"]["verl_drop_rate"] == pytest.approx(4 / (4 + 16))
    assert bench.ratios({"sync": sums["sync"]}) == {}  # nothing to compare with


def test_summary_refuses_too_few_steps_and_names_why() -> None:
    with pytest.raises(ValueError, match=r"colocate_async: logged 2 step\(s\), fewer than --warmup 2 \+ 1"):
        bench.summarize("colocate_async", [_step(1, 2, 3)] * 2, SETUP, warmup=2)
    with pytest.raises(KeyError, match="c3po/budget_used"):
        bench.summarize("c3po", [_step(1, 2, 3)] * 3, SETUP, warmup=1)


def test_a_long_response_gets_the_same_weights_with_more_positions(tmp_path: Path) -> None:
    """Past the tiny default's 512 positions every mode runs a longer-context copy: the same weights (RoPE has no
    position table), only max_position_embeddings differs."""
    from safetensors.torch import load_file

    from ring_ext.tiny.model import COMMON, build_model

    assert bench.MODEL_POSITIONS == COMMON["max_position_embeddings"]
    _, short = bench.parse(["--max-len", "448"])
    _, long = bench.parse(["--max-len", "1024", "--median", "32", "--heavy-sigma", "1.75", "--rounds", "3"])
    assert (short.positions, long.positions, long.sigma("heavy"), long.sigma("light")) == (512, 2048, 1.75, 0.25)
    run_dir = tmp_path / "round0" / "heavy" / "sync"
    model = [o for o in bench.mode_overrides("sync", long, 1.75, run_dir, run_dir / "l.yaml") if "model.path" in o]
    assert model == [f"actor_rollout_ref.model.path={tmp_path / 'round0' / 'model_2048'}"]
    assert not [o for o in bench.mode_overrides("sync", short, 1.0, run_dir, run_dir / "l.yaml") if "model.path" in o]
    path = bench.long_context_model(tmp_path / "round0", 2048)
    build_model(tmp_path / "default")
    assert json.loads((path / "config.json").read_text())["max_position_embeddings"] == 2048
    a, b = load_file(path / "model.safetensors"), load_file(tmp_path / "default" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    with pytest.raises(SystemExit):
        bench.parse(["--rounds", "0"])


def test_rounds_give_median_and_range_and_a_range_across_one_is_no_difference() -> None:
    rounds = [{"ratios": {"sync/c3po": {"rollout": r, "step": st}}} for r, st in ((2.1, 1.2), (1.9, 0.9), (2.4, 1.3))]
    sp = bench.spread(rounds)["sync/c3po"]
    assert sp["rollout"] == {"median": 2.1, "min": 1.9, "max": 2.4, "rounds": 3, "verdict": "c3po faster"}
    assert sp["step"]["verdict"] == "no difference" and sp["step"]["median"] == 1.2
    slower = bench.spread([{"ratios": {"sync/c3po": {"rollout": 0.8, "step": 0.9}}}])["sync/c3po"]
    assert slower["rollout"]["verdict"] == "c3po slower"
    result = {"command": "c", "setup": {}, "dists": {"heavy": {"spread": {"sync/c3po": sp}, "summary": {
        "c3po": {"engine_occupancy": 0.93, "cut_s": 0.2}, "sync": {}}}}}
    reg = bench.regime(result)
    assert reg["ratios"]["heavy"]["sync_over_abort"]["rollout"]["median"] == 2.1
    assert reg["modes"]["heavy"]["c3po"]["engine_occupancy"] == 0.93
    assert reg["modes"]["heavy"]["sync"]["engine_occupancy"] is None  # a mode without the metric says so


def test_the_loop_asks_verl_for_exactly_the_drawn_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """The class Hydra instantiates (`_target_` in the loop YAML) forwards max_tokens=L and ignore_eos to verl."""
    import asyncio
    import pickle

    from hydra._internal.utils import _locate
    from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

    cls = _locate("c3po_length_loop.LogNormalLengthAgentLoop")
    assert issubclass(cls, SingleTurnAgentLoop) and pickle.loads(pickle.dumps(cls)) is cls
    seen: list[tuple[dict, dict]] = []

    async def fake_run(self, sampling_params: dict, **kwargs: object) -> str:
        seen.append((sampling_params, kwargs))
        return "out"

    monkeypatch.setattr(SingleTurnAgentLoop, "run", fake_run)
    for key, value in {"SEED": "5", "MEDIAN": "24", "SIGMA": "1.0", "MAX": "64"}.items():
        monkeypatch.setenv(f"C3PO_BENCH_{key}", value)
    agent = cls.__new__(cls)  # no server: only run() is exercised
    agent.response_length = 256
    out = asyncio.run(agent.run({"temperature": 1.0}, index=17, session_id=1, raw_prompt=[]))
    assert out == "out"
    params, kwargs = seen[0]
    assert params == {"temperature": 1.0, "max_tokens": loop.draw_length(5, 17, 1, 24.0, 1.0, 64), "ignore_eos": True}
    assert kwargs["session_id"] == 1 and kwargs["index"] == 17  # the row fields still reach verl's loop


def test_report_survives_a_failed_run(tmp_path: Path) -> None:
    """One mode failing leaves the others' numbers in the table and the PNG."""
    pytest.importorskip("matplotlib")
    extra = {"c3po/budget_used": 1.0, "c3po/version_lag/mean": 0.0, "c3po/version_lag/max": 0,
             "c3po/groups_purged": 0, "c3po/groups_trained": 4}
    sums = {"sync": bench.summarize("sync", [_step(4, 8, 400)] * 3, SETUP, 1),
            "c3po": bench.summarize("c3po", [_step(2, 6, 400, **extra)] * 3, SETUP, 1)}
    result = {"command": "python benchmarks/bench_c3po_vllm.py", "setup": vars(SETUP), "dists": {"heavy": {
        "sigma": 1.0, "token_budget": 308, "modes": list(bench.MODES), "summary": sums, "ratios": bench.ratios(sums),
        "errors": {"colocate_async": "VerlRunError: colocate_async: exited 1\nlog tail"}}}}
    text = bench.table(result)
    assert "colocate_async  FAILED: VerlRunError: colocate_async: exited 1" in text and "log tail" not in text
    assert "      2.00       1.33" in text  # sync / c3po: (4/400)/(2/400), (8/400)/(6/400)
    bench.plot(result, tmp_path / "fair.png")
    assert (tmp_path / "fair.png").stat().st_size > 0


def test_baselines_occupancy_comes_from_recorded_engine_calls_over_the_sample_window(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every engine call (verl's per-segment `LLMServerClient.generate`, wrapped when C3PO_BENCH_SEGMENTS is set)
    and every training sample's window go to the folder; the baselines' occupancy is C3PO++'s rule over each
    window. Here verl's real client class is wrapped; its network call is the part replaced."""
    import asyncio

    import fast_poll_sampler as fast
    from verl.workers.rollout.llm_server import LLMServerClient

    class Out:
        token_ids = [1, 2, 3]

    async def engine_call(self, **kwargs: object) -> Out:
        await asyncio.sleep(0.05)
        return Out()

    monkeypatch.setattr(LLMServerClient, "generate", engine_call)
    monkeypatch.setenv(loop.SEGMENTS_ENV, str(tmp_path))
    loop._record_engine_calls()
    loop._record_engine_calls()  # once per process: a second call does not wrap twice
    assert LLMServerClient.generate.bench_recorded and LLMServerClient.generate is not engine_call

    async def two_calls() -> list[Out]:
        return await asyncio.gather(LLMServerClient.generate(object()), LLMServerClient.generate(object()))

    assert [o.token_ids for o in asyncio.run(two_calls())] == [[1, 2, 3]] * 2
    calls = loop.read_intervals(tmp_path, "segments")
    assert len(calls) == 2 and all(0.04 < b - a < 1.0 for a, b, _ in calls)
    assert [json.loads(line)[2] for f in tmp_path.glob("segments-*") for line in f.read_text().splitlines()] == [3, 3]

    class Inner:
        def sample(self, global_steps: int, partition_id: str, batch_size: int) -> str:
            return partition_id

    class Windows(fast._PhaseWindows, Inner):
        pass

    assert Windows().sample(1, "val", 2) == "val" and not list(tmp_path.glob("phases-*"))  # validation: no window
    for f in tmp_path.glob("*.jsonl"):
        f.unlink()
    # two steps: 4 engine slots; step 1's window 0-4 s with 4 calls 0-4, 0-4, 0-2, 0-2 (occupancy 0.75);
    # step 2's window 10-12 s with one call 10-12 (0.25) and one parked across the training 5-11 (0.125)
    for a, b in ((0, 4), (10, 12)):
        loop.append_interval("phases", a, b)
    for a, b in ((0, 4), (0, 4), (0, 2), (0, 2), (10, 12), (5, 11)):
        loop.append_interval("segments", a, b)
    steps: list[dict] = [{}, {}]
    bench.add_occupancy("sync", steps, tmp_path, capacity=4)
    assert [s["bench/engine_occupancy"] for s in steps] == pytest.approx([0.75, 0.375])
    one = [{}]
    bench.add_occupancy("sync", one, tmp_path, capacity=4)  # windows and steps disagree: no figure, said so
    assert one == [{}]
    kept = [_step(4, 8, 400, **{"bench/engine_occupancy": o}) for o in (0.9, 0.75, 0.375)]
    assert bench.summarize("sync", kept, SETUP, warmup=1)["engine_occupancy"] == pytest.approx(0.5625)

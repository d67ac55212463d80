"""The ``astate`` engine through verl's CheckpointEngineRegistry, between real Ray worker processes.

Stands in for verl's CheckpointEngineManager (it drives prepare -> build_topology -> init_process_group ->
send/receive -> finalize in the same order); the full manager + vLLM path is in test_e2e_astate.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import ray
import torch

from ring_ext_astate.engine import AStateCheckpointEngine
from ring_ext_astate.segments import sweep_orphans

TRAINERS, ROLLOUTS = 2, 2


@pytest.fixture(scope="module")
def ray_session():
    here = str(Path(__file__).parent)
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module", params=["shm", "dist"])
def peers(ray_session, request):
    """One set of worker processes per transport (each imports verl: seconds apiece on 2 cores). `dist` runs on
    one host here; it is the transport verl's workers on several hosts use (the topology test covers that)."""
    from astate_ray_peers import EnginePeer

    opts = {"slot_megabytes": 1, "slots": 2, "timeout_s": 4.0, "transport": request.param}
    return ([EnginePeer.remote(r, **opts) for r in range(TRAINERS)],
            [EnginePeer.remote(None, **opts) for _ in range(ROLLOUTS)])


def _sync(trainers, rollouts, step: int, die_after: int | None = None):
    meta = ray.get([p.call.remote("prepare") for p in trainers + rollouts])
    actor_kw, rollout_kw = AStateCheckpointEngine.build_topology(len(trainers), len(rollouts), meta)
    ray.get([p.call.remote("init_process_group", **{k: v[i] for k, v in actor_kw.items()})
             for i, p in enumerate(trainers)]
            + [p.call.remote("init_process_group", **{k: v[i] for k, v in rollout_kw.items()})
               for i, p in enumerate(rollouts)])
    sends = [p.send.remote(step, die_after if i == len(trainers) - 1 else None) for i, p in enumerate(trainers)]
    received = ray.get([p.receive.remote(step) for p in rollouts])
    return sends, received


def test_round_trip_bit_identical_then_updated_in_place(peers):
    from astate_ray_peers import model_weights

    trainers, rollouts = peers
    for step in (1, 2):
        sends, received = _sync(trainers, rollouts, step)
        metrics = ray.get(sends)
        ray.get([p.call.remote("finalize") for p in trainers + rollouts])
        assert received == [len(model_weights(step))] * ROLLOUTS
        for w in ray.get([p.get_weights.remote() for p in rollouts]):
            assert all(torch.equal(w[n], t) for n, t in model_weights(step).items())
        total = sum(t.nbytes for t in model_weights(step).values())
        assert sum(m["astate/bytes_per_sender"] for m in metrics) == total  # no byte sent twice
        assert [m["astate/version"] for m in metrics] == [step] * TRAINERS


def test_dead_trainer_rank_keeps_old_weights_and_fails_within_timeout(peers):
    """Runs after the round trip (module order): the rollout side holds step 2's weights."""
    from astate_ray_peers import model_weights

    trainers, rollouts = peers
    t0 = time.monotonic()
    sends, received = _sync(trainers, rollouts, 3, die_after=2)
    assert time.monotonic() - t0 < 12  # within the timeout, not a hang
    assert received == [0] * ROLLOUTS  # nothing handed to the server adapter
    for w in ray.get([p.get_weights.remote() for p in rollouts]):
        assert all(torch.equal(w[n], t) for n, t in model_weights(2).items())
    with pytest.raises(ray.exceptions.RayError):
        ray.get(sends)
    with pytest.raises(ray.exceptions.RayError, match="receiver"):
        ray.get(sends[0])  # the surviving sender names the failing side


def test_unknown_option_and_bad_values_are_refused():
    with pytest.raises(ValueError, match=r"unknown .*engine_kwargs.astate key\(s\) \['slot_mb'\]; known: .*'slots'"):
        AStateCheckpointEngine(bucket_size=1 << 20, slot_mb=4)
    with pytest.raises(ValueError, match="verify"):
        AStateCheckpointEngine(bucket_size=1 << 20, verify="sometimes")
    with pytest.raises(ValueError, match="engine_kwargs.astate.timeout_s must be a number > 0, got 0"):
        AStateCheckpointEngine(bucket_size=1 << 20, timeout_s=0)
    with pytest.raises(ValueError, match="transport must be one of"):
        AStateCheckpointEngine(bucket_size=1 << 20, transport="rdma")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_ipc_without_cuda_is_refused_at_prepare():
    engine = AStateCheckpointEngine(bucket_size=1 << 20, is_master=True, transport="cuda_ipc")
    with pytest.raises(ValueError, match="'cuda_ipc' needs CUDA on every worker"):
        engine.prepare()


@pytest.mark.parametrize("transport", ["shm", "dist"])
def test_a_worker_builds_only_its_own_side(transport: str):
    """A rollout worker's engine makes no sender (no shared memory that would outlive it); a trainer's does."""
    shm = lambda: set(os.listdir("/dev/shm"))  # noqa: E731
    sweep_orphans()  # an earlier test's killed peers: the sender's prepare would sweep them mid-test
    before = shm()
    receiver = AStateCheckpointEngine(bucket_size=1 << 20, transport=transport)
    receiver.prepare()
    assert type(receiver.peer).__name__.endswith("Receiver") and shm() == before
    sender = AStateCheckpointEngine(bucket_size=1 << 20, is_master=True, transport=transport)
    meta = sender.prepare()
    assert type(sender.peer).__name__.endswith("Sender") and meta["sender"]
    assert len(shm() - before) == (4 if transport == "shm" else 0)  # the shm sender's ring of 4 slots
    for engine in (receiver, sender):
        engine._drop_peer()
    assert shm() == before


def _meta(host: str, sender: bool, transport: str = "shm", **extra) -> dict:
    return {"host": host, "sender": sender, "transport": transport, "address": f"tcp://{host}:1", **extra}


def test_topology_refuses_several_hosts_unless_dist():
    with pytest.raises(ValueError, match=r"works on one host.*transport to one of \['dist'\]"):
        AStateCheckpointEngine.build_topology(1, 1, [_meta("a", True), _meta("b", False)])
    with pytest.raises(ValueError, match="disagree on the transport"):
        AStateCheckpointEngine.build_topology(1, 1, [_meta("a", True), _meta("a", False, "dist")])
    meta = [_meta("a", True, "dist", store=("10.0.0.1", 29501)), _meta("b", True, "dist", store=("10.0.0.2", 1)),
            _meta("c", False, "dist"), _meta("d", False, "dist")]
    actor, rollout = AStateCheckpointEngine.build_topology(2, 2, meta)
    # one gloo group: trainer ranks 0-1 then rollout workers 2-3, its store served by trainer rank 0
    assert actor["group"] == [(("10.0.0.1", 29501), 0, 4), (("10.0.0.1", 29501), 1, 4)]
    assert rollout["group"] == [(("10.0.0.1", 29501), 2, 4), (("10.0.0.1", 29501), 3, 4)]
    assert actor["peers"][0] == [{"address": "tcp://c:1", "group_rank": 2}, {"address": "tcp://d:1", "group_rank": 3}]
    assert rollout["peers"][1] == [{"address": "tcp://a:1", "group_rank": 0}, {"address": "tcp://b:1", "group_rank": 1}]
    assert actor["world"] == rollout["world"] == [2, 2]  # senders per tensor: each sends a 1/2 share

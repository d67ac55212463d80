"""separate_async's direct path: the `astate` checkpoint engine's trainer ranks write their shares of a rollout worker's
planned slices into its parameters themselves (no staging), and the topology chooses that path only where it holds.

The rollout worker is the stand-in of `inplace_worker.py` (vLLM's worker end: arena, plan, control server; the
production classes) and the replica leader's "session open" marker is touched by the test, as `adapter.py` does after
vLLM's `start_weight_update`. The whole path with vLLM and verl's CheckpointEngineManager runs in
`test_e2e_astate.py`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from inplace_worker import fused_weights, stand_in_worker

from ring_ext_astate.adapter import DirectTarget, WrittenInPlace, started_marker
from ring_ext_astate.control import descriptor_path
from ring_ext_astate.engine import AStateCheckpointEngine
from ring_ext_astate.errors import SyncError
from ring_ext_astate.inplace import check_reports


@pytest.fixture
def worker(tmp_path: Path):
    yield from stand_in_worker(tmp_path)


def _trainer_rank(rank: int, world: int, target: DirectTarget, timeout_s: float = 5.0) -> AStateCheckpointEngine:
    engine = AStateCheckpointEngine(bucket_size=1 << 20, is_master=rank == 0, timeout_s=timeout_s)
    engine.init_process_group(rank=rank, world=world, peers=[target], via="inplace")
    return engine


def test_two_trainer_ranks_write_their_shares_and_the_worker_commits_exactly_their_union(worker: dict) -> None:
    desc = str(descriptor_path(worker["dir"], 0))
    target = DirectTarget(desc, version=1, verify=True, host="h")
    started_marker(desc, 1).touch()  # the replica's leader opened vLLM's session for sync 1
    w = fused_weights(4)
    metrics = [asyncio.run(_trainer_rank(r, 2, target).send_weights(iter(w.items()))) for r in range(2)]
    plan = worker["plan"]
    assert [m["astate/direct"] for m in metrics] == [1.0, 1.0] and [m["astate/version"] for m in metrics] == [1, 1]
    assert all(m["astate/bytes_per_sender"] > 0 for m in metrics)
    assert sum(m["astate/bytes_per_sender"] for m in metrics) == plan.nbytes  # every planned byte once, no more
    reports = worker["server"].wait_reports(1, 2, timeout_s=5)
    assert sorted(r["sender"] for r in reports) == [0, 1]
    assert check_reports(plan, reports, 1, worker["arena"].bytes, verify=True, rank=0) == plan.nbytes
    qk, norm = worker["model"].qk.detach(), worker["model"].norm.detach()
    assert torch.equal(qk[:4], w["q"].bfloat16()) and torch.equal(qk[4:], w["k"][:2].bfloat16())
    assert torch.equal(norm, w["norm"].bfloat16())


def test_a_trainer_rank_does_not_write_before_the_session_opens_and_names_what_it_waited_for(worker: dict) -> None:
    desc = str(descriptor_path(worker["dir"], 0))
    before = worker["arena"].bytes.clone()
    engine = _trainer_rank(0, 1, DirectTarget(desc, version=1, verify=False, host="h"), timeout_s=0.3)
    with pytest.raises(SyncError, match=r"no start of sync 1 at .*started-1-0 within 0.3s"):
        asyncio.run(engine.send_weights(iter(fused_weights(5).items())))
    assert torch.equal(worker["arena"].bytes, before)  # nothing landed


def _meta(sender: bool, host: str = "h", **kw) -> dict:
    return {"host": host, "sender": sender, "transport": "shm", **kw}


def test_the_topology_writes_directly_only_where_every_worker_offers_it() -> None:
    targets = [DirectTarget(f"/run/worker{i}.json", 3, False, "h") for i in range(2)]
    senders = [_meta(True, address=f"ipc://s{i}") for i in range(3)]
    actor, rollout = AStateCheckpointEngine.build_topology(3, 2, senders + [_meta(False, direct=t) for t in targets])
    assert actor == {"rank": [0, 1, 2], "world": [3] * 3, "peers": [targets] * 3, "via": ["inplace"] * 3}
    assert rollout == {"rank": [0, 1], "world": [3, 3], "peers": [[], []], "via": ["inplace", "inplace"]}
    # the first sync (no worker has its in-place engine yet): staged
    actor, _ = AStateCheckpointEngine.build_topology(3, 2, senders + [_meta(False, address=f"r{i}") for i in range(2)])
    assert "via" not in actor and actor["peers"] == [["r0", "r1"]] * 3
    # a worker without an in-place engine beside one that has dropped its staging (a replica added later): named
    mixed = senders + [_meta(False, direct=targets[0]), _meta(False, address="r1")]
    with pytest.raises(ValueError, match=r"rollout worker\(s\) \[1\] offer no in-place engine"):
        AStateCheckpointEngine.build_topology(3, 2, mixed)
    # across hosts the trainer ranks cannot map the workers' memory: the dist transport carries one worker's
    # slices into place; two workers (each would need its own slices) stay staged
    two_hosts = [{**m, "transport": "dist", "store": ("h", 1)} for m in senders] + [
        {**_meta(False, host=f"h{i}", direct=t), "transport": "dist", "address": f"tcp://r{i}"}
        for i, t in enumerate(targets)]
    actor, _ = AStateCheckpointEngine.build_topology(3, 2, two_hosts)
    assert "via" not in actor and actor["group"][0] == (("h", 1), 0, 5)  # the dist transport's gloo group
    actor, rollout = AStateCheckpointEngine.build_topology(3, 1, two_hosts[:4])
    assert actor["via"] == ["carried"] * 3 and actor["targets"] == [[targets[0]]] * 3 and rollout["via"] == ["carried"]
    assert actor["group"][0] == (("h", 1), 0, 4) and rollout["group"] == [(("h", 1), 3, 4)]


def test_the_adapter_gets_the_sync_to_commit_and_nothing_to_iterate() -> None:
    written = WrittenInPlace(version=4, senders=2, verify=False)

    async def drain() -> list:
        return [item async for item in written]  # verl's own update_weights would apply an empty update

    assert asyncio.run(drain()) == [] and (written.version, written.senders) == (4, 2)


@pytest.mark.parametrize("verify", [True, False])
def test_a_rollout_worker_offers_its_worker_and_drops_its_staging(monkeypatch, verify: bool) -> None:
    """The adapter's in-place state (what `direct_target` reads) stands in for a worker set up by a first sync: the
    engine offers it, keeps no staging arena, and hands the adapter the sync to commit with the offer's verification
    (one options section decides it for the writers and the worker alike)."""
    import ring_ext_astate.engine as engine_module

    offer = DirectTarget("/run/worker0.json", version=2, verify=verify, host="h")
    monkeypatch.setattr(engine_module, "direct_target", lambda host, with_plan=False: offer)
    receiver = AStateCheckpointEngine(bucket_size=1 << 20, verify="always")
    meta = receiver.prepare()
    assert meta["direct"] is offer and "address" not in meta and receiver.peer is None
    receiver.init_process_group(rank=0, world=3, peers=[], via="inplace")
    written = receiver.receive_weights()
    assert isinstance(written, WrittenInPlace) and (written.version, written.senders, written.verify) == (2, 3, verify)


def _carried_sender(q_in, q_out, seed: int) -> None:
    """A trainer rank on "another host": its engine sends over the dist transport (gloo + TCP on loopback)."""
    import ring_ext_astate.engine as engine_module
    from inplace_worker import fused_weights

    engine_module._node_ip = lambda: "127.0.0.1"  # test traffic stays on loopback
    engine = AStateCheckpointEngine(bucket_size=1 << 20, is_master=True, transport="dist", timeout_s=30)
    q_out.put(engine.prepare())
    engine.init_process_group(**q_in.get())
    try:
        q_out.put(asyncio.run(engine.send_weights(iter(fused_weights(seed).items()))))
    except Exception as e:  # noqa: BLE001  (reported to the test)
        q_out.put(repr(e))
    engine.finalize()


def test_across_hosts_the_transport_carries_the_workers_slices_into_its_parameters(worker: dict, monkeypatch) -> None:
    """The dist transport's carried path: the trainer rank cuts the worker's slices from the plan it was offered, and
    the rollout host's engine receives them straight into the worker's parameters (no staging buffer), then reports
    what arrived; the worker's own check commits it."""
    import multiprocessing as mp

    import ring_ext_astate.engine as engine_module
    from ring_ext_astate.inplace import InPlaceSender

    writer = InPlaceSender(str(descriptor_path(worker["dir"], 0)), timeout_s=5)  # the server adapter's, on that host
    offer = DirectTarget(str(descriptor_path(worker["dir"], 0)), 1, True, "rollout-host", writer.welcome.plan,
                         writer.welcome.ignored)  # verified: the transport checks the bytes against the trainer's
    monkeypatch.setattr(engine_module, "direct_target", lambda host, with_plan=False: offer if with_plan else None)
    monkeypatch.setattr(engine_module, "_node_ip", lambda: "127.0.0.1")
    receiver = AStateCheckpointEngine(bucket_size=1 << 20, transport="dist", timeout_s=30)
    ctx = mp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_carried_sender, args=(q_in, q_out, 6))
    proc.start()
    try:
        sender_meta = {**q_out.get(timeout=120), "host": "trainer-host"}
        actor, rollout = AStateCheckpointEngine.build_topology(1, 1, [sender_meta, receiver.prepare()])
        assert actor["via"] == ["carried"] and rollout["via"] == ["carried"]
        q_in.put({k: v[0] for k, v in actor.items()})
        receiver.init_process_group(**{k: v[0] for k, v in rollout.items()})
        written = receiver.receive_weights()
        assert isinstance(written, WrittenInPlace) and written.senders == 1 and written.receive is not None
        stats = asyncio.run(written.receive(writer, 1, written.verify))  # as the adapter does, the session open
        sent = q_out.get(timeout=60)
    finally:
        proc.join(30)
    assert isinstance(sent, dict), sent
    plan, w = worker["plan"], fused_weights(6)
    assert sent["astate/direct"] == 1.0 and sent["astate/bytes_per_sender"] == plan.nbytes == stats.bytes
    writer.report(1, 0, stats)
    reports = worker["server"].wait_reports(1, 1, timeout_s=5)
    assert check_reports(plan, reports, 1, worker["arena"].bytes, verify=True, rank=0) == plan.nbytes
    qk = worker["model"].qk.detach()
    assert torch.equal(qk[:4], w["q"].bfloat16()) and torch.equal(qk[4:], w["k"][:2].bfloat16())
    assert torch.equal(worker["model"].norm.detach(), w["norm"].bfloat16())
    arena = writer.target(1).untyped_storage().data_ptr()  # the received bytes' buffers are the worker's own memory
    assert receiver.peer.pool and {t.untyped_storage().data_ptr() for t in receiver.peer.pool.values()} == {arena}
    writer.close()
    receiver.finalize()


def test_one_section_holds_every_astate_knob_and_the_old_one_is_named() -> None:
    from omegaconf import OmegaConf

    from ring_ext_astate.options import AStateOptions

    rollout = OmegaConf.create({"checkpoint_engine": {"engine_kwargs": {"astate": {
        "verify": "always", "retries": 0, "transport": "dist", "slots": 2}}}})
    o = AStateOptions.from_rollout_config(rollout)
    assert (o.verify, o.retries, o.transport, o.slots, o.timeout_s) == ("always", 0, "dist", 2, 120.0)
    assert o.in_place_knobs_set() == ["retries"]
    engine = AStateCheckpointEngine(bucket_size=1 << 20, **rollout.checkpoint_engine.engine_kwargs.astate)
    assert engine.options == o  # verl hands the engine the same section the adapter reads
    old = OmegaConf.create({"checkpoint_engine": {"engine_kwargs": {"astate_inplace": {"shadow": True}}}})
    with pytest.raises(ValueError, match=r"astate_inplace is now part of .*engine_kwargs.astate .* set "
                                         r".*engine_kwargs\.astate\.shadow instead"):
        AStateOptions.from_rollout_config(old)
    with pytest.raises(ValueError, match=r"unknown .*engine_kwargs.astate key\(s\) \['slot'\]"):
        AStateCheckpointEngine(bucket_size=1 << 20, slot=2)
    with pytest.raises(ValueError, match=r"astate.transport must be one of \['cuda_ipc', 'dist', 'shm'\]"):
        AStateCheckpointEngine(bucket_size=1 << 20, transport="rdma")

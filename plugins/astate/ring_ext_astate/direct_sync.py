"""separate_async without staging: the two ways a sync reaches vLLM's parameters once the first sync has set each
worker's in-place engine up (`adapter.direct_target`). No verl import.

- inplace (one host): each trainer rank maps the workers' parameter arenas and writes its share of their planned
  slices (`Plan.share`) itself (`write_in_place`); each worker commits once all ranks' reports cover every planned
  byte exactly once.
- carried (across hosts, `transport: dist`): each trainer rank cuts its share of the worker's slices from the plan it
  was offered (`carried_slices`), the transport carries them whole, and the rollout host receives them straight into
  the worker's parameters (`receive_into_place`: the transport's receive buffers are views of the arena) and reports
  what arrived.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from ring_ext_astate.adapter import DirectTarget, started_marker
from ring_ext_astate.control import wait_for_file
from ring_ext_astate.errors import SyncError
from ring_ext_astate.inplace import InPlaceSender, WriteStats, source_slice, write_workers
from ring_ext_astate.shm_transport import ShmReceiver, host_digest


def direct_metrics(moved: int, seconds: float, version: int, verify: bool, buckets: int = 0) -> dict:
    """A trainer rank's metrics for a sync that staged nothing (verl logs what send_weights returns)."""
    return {"astate/bytes_per_sender": moved, "astate/buckets": buckets, "astate/seconds": seconds,
            "astate/gb_per_s": moved / max(seconds, 1e-9) / 1e9, "astate/version": version, "astate/direct": 1.0,
            "astate/verified": float(verify)}


def write_in_place(writers: dict[str, InPlaceSender], weights: Iterable[tuple[str, torch.Tensor]],
                   targets: list[DirectTarget], rank: int, world: int, timeout_s: float) -> dict:
    """Trainer rank `rank` of `world`: its share of every worker's planned slices, written into vLLM's parameters
    once each replica's leader opened the session. `writers` (by descriptor) keeps the mappings across syncs."""
    versions = {t.version for t in targets}
    if len(versions) != 1:
        raise SyncError(f"astate: rollout workers disagree on the next version: {sorted(versions)}")
    version, verify = targets[0].version, any(t.verify for t in targets)
    t0 = time.perf_counter()
    for t in targets:
        if t.descriptor not in writers:
            writers[t.descriptor] = InPlaceSender(t.descriptor, timeout_s)
        wait_for_file(started_marker(t.descriptor, version), timeout_s, f"start of sync {version}")
    mine = [writers[t.descriptor] for t in targets]
    stats = write_workers(mine, weights, version, verify, [w.welcome.plan.share(rank, world) for w in mine])
    for w, st in zip(mine, stats):
        w.report(version, rank, st)
    return direct_metrics(sum(st.bytes for st in stats), time.perf_counter() - t0, version, verify)


def carried_key(name: str, i: int) -> str:
    """The transport's name for destination `i` of checkpoint tensor `name`."""
    return f"{name}#{i}"


def carried_slices(weights: Iterable[tuple[str, torch.Tensor]], target: DirectTarget, rank: int,
                   world: int) -> Iterable[tuple[str, torch.Tensor]]:
    """Trainer rank `rank`'s share of the worker's planned slices, cut from its tensors (the recorded views replayed)
    in the parameters' dtype: the bytes the worker's parameters will hold."""
    plan, seen = target.plan, set()
    share = plan.share(rank, world)
    for name, t in weights:
        ds = plan.destinations.get(name)
        if ds is None:
            if name in target.ignored:
                continue
            raise SyncError(f"astate: the trainer sent {name!r}, which rollout worker 0's plan has no place for "
                            "(across hosts its loaders cannot be asked)")
        seen.add(name)
        for i, d in enumerate(ds):
            if (name, i) in share:
                yield carried_key(name, i), source_slice(name, t, d).to(getattr(torch, d.dtype))
    missing = sorted({n for n, _ in share} - seen)
    if missing:
        raise SyncError(f"astate: the trainer sent no {missing[:5]} ({len(missing)} tensors rollout worker 0 needs)")


def receive_into_place(peer: ShmReceiver, writer: InPlaceSender, version: int, verify: bool) -> WriteStats:
    """The carried slices of sync `version`, received into the arena that sync writes: the receiver assembles into
    its pool's buffers (found by name, shape and dtype), which are here the destinations themselves. Reports what
    arrived, not what was planned, so the worker's own check finds a slice no trainer rank sent."""
    arena, plan = writer.target(version), writer.welcome.plan
    into, where = {}, {}
    for name, ds in plan.destinations.items():
        for i, d in enumerate(ds):
            view = arena[d.offset:d.offset + d.nbytes].view(getattr(torch, d.dtype)).view(d.shape)
            into[(carried_key(name, i), tuple(d.shape), d.dtype)] = view
            where[carried_key(name, i)] = (d.offset, d.offset + d.nbytes)
    peer.pool = into
    got = peer.receive(version, expected={m[0]: m for m in into}, verify=verify)
    ranges = sorted(where[k] for k in got)
    digests = [(a, b, host_digest(arena[a:b])) for a, b in ranges if b > a] if verify else []
    return WriteStats(bytes=sum(b - a for a, b in ranges), verified=verify, ranges=ranges, digests=digests)

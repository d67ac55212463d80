"""verl checkpoint engine ``astate``: the AState-like transports behind verl 0.9.1's CheckpointEngine interface.

Select it with ``actor_rollout_ref.rollout.checkpoint_engine.backend=astate``; options (`AStateOptions`, every
astate knob, ring_ext_astate.options) go under ``checkpoint_engine.engine_kwargs.astate``. verl builds one engine
per trainer rank (with ``is_master``) and one per rollout worker (without it), then per sync calls prepare ->
build_topology -> init_process_group -> send_weights / receive_weights -> finalize.

Without staging (from the second sync on, `direct_sync`): once the first sync has set the rollout worker's in-place
engine up (ring_ext_astate.adapter), each rollout worker offers it in `prepare`. On one host every trainer rank then
writes its share of the worker's planned slices (`Plan.share`) straight into vLLM's parameters (`via="inplace"`);
across hosts (`transport: dist`, one rollout worker) it sends that share and the rollout host receives it into the
parameters (`via="carried"`). The worker commits only when the reports cover every planned byte exactly once.

Staged (the first sync; several rollout workers across hosts): every trainer rank sends its share of each tensor (no
rank-0 funnel); each rollout worker stages the whole update and hands it to verl's server adapter only after every
sender committed (cost: one staged copy of the weights on the rollout host).

Transports (option `transport`), for the staged syncs and the carried ones: `shm` (default; shared memory, one
host: the trainer ranks write into each rollout worker's staging arena), `dist` (gloo
point to point plus ZeroMQ TCP, for workers on several hosts: a fresh gloo group per sync, its store served by
trainer rank 0) and `cuda_ipc` (device memory between GPUs of one host). `build_topology` refuses several hosts
unless `dist`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, AsyncGenerator, Iterable, Literal

import torch
from verl.checkpoint_engine.base import CheckpointEngine, CheckpointEngineRegistry

from ring_ext_astate.adapter import DirectTarget, WrittenInPlace, direct_target
from ring_ext_astate.cuda_transport import CudaIpcReceiver, CudaIpcSender
from ring_ext_astate.direct_sync import carried_slices, direct_metrics, receive_into_place, write_in_place
from ring_ext_astate.direct_transport import DirectShmReceiver, DirectShmSender
from ring_ext_astate.dist_transport import DistReceiver, DistSender, free_port, gloo_group
from ring_ext_astate.errors import SyncError
from ring_ext_astate.inplace import InPlaceSender, WriteStats
from ring_ext_astate.options import SECTION, AStateOptions
from ring_ext_astate.shm_transport import Meta, ShmReceiver, ShmSender, _meta


logger = logging.getLogger("ring_ext")


# staged: through a transport into the rollout host's staging, then written in place by the server adapter;
# inplace: one host, each trainer rank writes its share into the workers' parameters;
# carried: across hosts, each trainer rank sends its share of the worker's slices, which land in its parameters
Via = Literal["staged", "inplace", "carried"]


@dataclass(frozen=True)
class Transport:
    """One way bytes move from trainer ranks to rollout workers: its sender and receiver classes, whether it spans
    hosts, whether it needs CUDA."""

    sender: type[ShmSender]
    receiver: type[ShmReceiver]
    many_hosts: bool = False
    needs_cuda: bool = False


# a new transport is a module with a sender and a receiver (the ShmSender / ShmReceiver protocol) and one line here
TRANSPORTS = {
    "shm": Transport(DirectShmSender, DirectShmReceiver),
    "dist": Transport(DistSender, DistReceiver, many_hosts=True),
    "cuda_ipc": Transport(CudaIpcSender, CudaIpcReceiver, needs_cuda=True),
}


@CheckpointEngineRegistry.register("astate")
class AStateCheckpointEngine(CheckpointEngine):
    def __init__(self, bucket_size: int, is_master: bool | None = None, **options: Any) -> None:
        self.options = AStateOptions.from_kwargs(options)
        if self.options.transport not in TRANSPORTS:
            raise ValueError(f"{SECTION}.transport must be one of {sorted(TRANSPORTS)}, got {self.options.transport!r}")
        self.sender_side = is_master is not None  # verl passes is_master to trainer ranks only
        self.slot_bytes = min(bucket_size, self.options.slot_megabytes << 20)
        self.syncs = 0
        self.layout: list[Meta] | None = None
        self.peer: ShmSender | ShmReceiver | None = None
        self.rank, self.world = 0, 1
        self.via: Via = "staged"  # how this sync's bytes travel (build_topology decides)
        self.targets: list[DirectTarget] | None = None  # this sync's workers, unless staged
        self.writers: dict[str, InPlaceSender] = {}  # by descriptor, kept across syncs (their arena mappings)
        self.offered: DirectTarget | None = None  # a rollout worker's offer in this sync's prepare

    def _new_peer(self) -> ShmSender | ShmReceiver:
        o, kw = self.options, {}  # rank and world are set in init_process_group
        transport = TRANSPORTS[o.transport]
        if transport.needs_cuda and not torch.cuda.is_available():
            raise ValueError(f"astate transport {o.transport!r} needs CUDA on every worker; use one of "
                             f"{sorted(k for k, t in TRANSPORTS.items() if not t.needs_cuda)}")
        sender, receiver = transport.sender, transport.receiver
        if transport.many_hosts:  # its peers listen on this node's address, not on loopback
            self.ip = _node_ip()
            kw = {"host": self.ip}
        if self.sender_side:  # only the side this worker plays: a sender's shared memory would outlive it
            return sender(0, 1, self.slot_bytes, o.slots, o.timeout_s, **kw)
        return receiver(0, o.timeout_s, **kw)

    def prepare(self) -> dict[str, Any]:
        host = socket.gethostname()
        meta = {"host": host, "sender": self.sender_side, "transport": self.options.transport}
        many_hosts = TRANSPORTS[self.options.transport].many_hosts
        target = None if self.sender_side else direct_target(host, with_plan=many_hosts)
        self.offered = target
        if target is not None and not many_hosts:  # the trainer ranks write the worker themselves: no staging
            self._drop_peer()
            return {**meta, "direct": target}
        if self.sender_side and self.via == "inplace":  # the last sync was direct: no ring until one is needed
            return meta
        # the peer (its shared memory, sockets, staging buffers) lives across syncs: fresh memory would
        # page-fault on every byte of every sync; it is rebuilt only after a failed sync
        if self.peer is None:
            self.peer = self._new_peer()
        meta.update(self.peer.address())
        if target is not None:  # across hosts: the transport carries the worker's slices into place
            meta["direct"] = target
        if isinstance(self.peer, DistSender):  # every trainer rank offers; build_topology takes rank 0's
            meta["store"] = (self.ip, free_port())
        return meta

    @classmethod
    def build_topology(cls, actor_wg_world_size: int, rollout_world_size: int, metadata: list[dict]):
        hosts, transports = {m["host"] for m in metadata}, {m["transport"] for m in metadata}
        if len(transports) > 1:
            raise ValueError(f"astate: workers disagree on the transport: {sorted(transports)}")
        if len(hosts) > 1 and not TRANSPORTS[min(transports)].many_hosts:
            spanning = sorted(k for k, t in TRANSPORTS.items() if t.many_hosts)
            raise ValueError(f"astate transport {min(transports)!r} works on one host; workers span {sorted(hosts)}:"
                             f" set checkpoint_engine.engine_kwargs.astate.transport to one of {spanning}")
        senders, receivers = metadata[:actor_wg_world_size], metadata[actor_wg_world_size:]
        if not all(m["sender"] for m in senders) or any(m["sender"] for m in receivers):
            raise ValueError("astate: expected trainer ranks first, then rollout workers, in verl's metadata")
        a, r = actor_wg_world_size, rollout_world_size
        if all("direct" in m for m in receivers):
            targets = [m["direct"] for m in receivers]
            if transports != {"dist"} and len(hosts) == 1:  # the trainer ranks write the workers' memory
                return ({"rank": list(range(a)), "world": [a] * a, "peers": [targets] * a, "via": ["inplace"] * a},
                        {"rank": list(range(r)), "world": [a] * r, "peers": [[]] * r, "via": ["inplace"] * r})
            if transports == {"dist"} and r == 1:  # the transport carries the worker's slices into place
                actor, rollout = cls._dist_topology(senders, receivers)
                return ({**actor, "via": ["carried"] * a, "targets": [targets] * a}, {**rollout, "via": ["carried"]})
        if not all("address" in m for m in metadata):  # some moved to direct writes (and dropped their staging)
            raise ValueError(f"astate: rollout worker(s) {[i for i, m in enumerate(receivers) if 'direct' not in m]} "
                             "offer no in-place engine while the trainer ranks or other workers write in place (a "
                             "replica added or restarted after the first sync): a staged sync beside direct ones is "
                             "not built")
        if transports == {"dist"}:
            return cls._dist_topology(senders, receivers)
        addrs = [m["address"] for m in receivers]
        actor = {"rank": list(range(actor_wg_world_size)), "world": [actor_wg_world_size] * actor_wg_world_size,
                 "peers": [addrs] * actor_wg_world_size}
        rollout = {"rank": list(range(rollout_world_size)), "world": [actor_wg_world_size] * rollout_world_size,
                   "peers": [senders] * rollout_world_size}
        return actor, rollout

    @staticmethod
    def _dist_topology(senders: list[dict], receivers: list[dict]):
        """One gloo group per sync over every worker: trainer ranks 0..A-1, rollout workers A..A+R-1."""
        a, world = len(senders), len(senders) + len(receivers)
        to_recv = [{"address": m["address"], "group_rank": a + i} for i, m in enumerate(receivers)]
        to_send = [{"address": m["address"], "group_rank": i} for i, m in enumerate(senders)]
        group = [(senders[0]["store"], r, world) for r in range(world)]
        actor = {"rank": list(range(a)), "world": [a] * a, "peers": [to_recv] * a, "group": group[:a]}
        rollout = {"rank": list(range(len(receivers))), "world": [a] * len(receivers),
                   "peers": [to_send] * len(receivers), "group": group[a:]}
        return actor, rollout

    def init_process_group(self, rank: int, world: int, peers: list, group: tuple | None = None,
                           via: Via = "staged", targets: list[DirectTarget] | None = None) -> None:
        self.rank, self.world, self.via = rank, world, via
        self.targets = peers if via == "inplace" else targets
        if via == "inplace":  # the staged ring is not used again (its mappings of the workers' old arenas released)
            self._drop_peer()
            return
        assert self.peer is not None, "prepare() must run before init_process_group()"
        if group is not None:  # dist: every worker joins this sync's group (they run this concurrently)
            (host, port), group_rank, group_world = group
            self.peer.group = gloo_group(host, port, group_rank, group_world, self.options.timeout_s)
        self.peer.rank = rank
        if isinstance(self.peer, ShmSender):
            self.peer.world = world
        self.peer.connect(peers)

    def _verify(self) -> bool:
        return self.options.verified(self.syncs + 1)

    async def send_weights(self, weights: Iterable[tuple[str, torch.Tensor]], global_steps: int | None = None):
        if self.via == "inplace":
            return self._write_in_place(weights, self.targets)
        if self.via == "carried":
            return self._send_carried(weights, self.targets[0])
        assert isinstance(self.peer, ShmSender), "send_weights runs on trainer ranks after init_process_group()"
        sent: list[Meta] = []

        def recorded() -> Iterable[tuple[str, torch.Tensor]]:
            for name, t in weights:
                sent.append(_meta(name, t))
                yield name, t

        t0 = time.perf_counter()
        try:
            stats = self.peer.send(recorded(), self.syncs + 1, verify=self._verify(), manifest=self.layout)
        except BaseException:
            self._drop_peer()
            raise
        seconds = time.perf_counter() - t0
        self.layout, self.syncs = sent, self.syncs + 1
        return {
            "astate/bytes_per_sender": stats.bytes_moved, "astate/buckets": stats.buckets,
            "astate/seconds": seconds, "astate/gb_per_s": stats.bytes_moved / max(seconds, 1e-9) / 1e9,
            **{f"astate/seconds_{k}": v for k, v in stats.seconds.items()}, "astate/version": self.syncs,
            "astate/direct": 0.0,
        }

    def _write_in_place(self, weights: Iterable[tuple[str, torch.Tensor]], targets: list[DirectTarget]) -> dict:
        metrics = write_in_place(self.writers, weights, targets, self.rank, self.world, self.options.timeout_s)
        self.syncs = metrics["astate/version"]
        return metrics

    def _send_carried(self, weights: Iterable[tuple[str, torch.Tensor]], target: DirectTarget) -> dict:
        t0 = time.perf_counter()
        try:
            stats = self.peer.send(carried_slices(weights, target, self.rank, self.world), target.version,
                                   verify=target.verify, whole=True)
        except BaseException:
            self._drop_peer()
            raise
        self.syncs = target.version
        return direct_metrics(stats.bytes_moved, time.perf_counter() - t0, target.version, target.verify,
                              stats.buckets)

    async def _receive_into_place(self, writer: InPlaceSender, version: int, verify: bool) -> WriteStats:
        try:
            return await asyncio.to_thread(receive_into_place, self.peer, writer, version, verify)
        except SyncError:
            self._drop_peer()
            raise

    def receive_weights(self, global_steps: int | None = None) -> AsyncGenerator[tuple[str, torch.Tensor], None]:
        """What verl's checkpoint-engine worker hands its server adapter: the staged tensors, or, when the trainer
        ranks wrote the worker themselves, a `WrittenInPlace` for the adapter to commit."""
        if self.via == "staged":
            return self._receive_staged()
        assert self.offered is not None, "a direct sync on a rollout worker that offered none"
        self.syncs = self.offered.version
        if self.via == "inplace":
            return WrittenInPlace(self.offered.version, self.world, self.offered.verify)  # type: ignore[return-value]
        return WrittenInPlace(self.offered.version, 1, self.offered.verify,  # type: ignore[return-value]
                              receive=self._receive_into_place)

    async def _receive_staged(self) -> AsyncGenerator[tuple[str, torch.Tensor], None]:
        assert isinstance(self.peer, ShmReceiver), "receive_weights runs on rollout workers after init_process_group()"
        expected = {m[0]: m for m in self.layout} if self.layout else None
        try:
            # versions count syncs on both sides; the receiver reports its count back and senders check it
            staged = await asyncio.to_thread(self.peer.receive, self.syncs + 1, expected=expected,
                                             verify=self._verify())
        except SyncError as e:  # yield nothing: the server adapter finishes an empty update, weights stay whole
            self._drop_peer()
            logger.error("astate: weight sync %d failed, rollout keeps its previous weights: %s", self.syncs + 1, e)
            return
        self.layout, self.syncs = [_meta(n, t) for n, t in staged.items()], self.syncs + 1
        for item in staged.items():
            yield item

    def finalize(self) -> None:
        """Nothing to free per sync: the peer's buffers are reused by the next one (see prepare)."""

    def _drop_peer(self) -> None:
        if self.peer is not None:
            self.peer.close()
            self.peer = None


def _node_ip() -> str:
    """This node's address as Ray knows it (verl's workers are Ray actors), else the host name's."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # no Ray: a plain process (tests, tools)
        return socket.gethostbyname(socket.gethostname())

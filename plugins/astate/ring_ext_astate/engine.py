"""verl checkpoint engine ``astate``: the shared-memory transport behind verl 0.9.1's CheckpointEngine interface.

Select it with ``actor_rollout_ref.rollout.checkpoint_engine.backend=astate``; options (`AStateOptions`) go
under ``checkpoint_engine.engine_kwargs.astate``. verl builds one engine per trainer rank (with
``is_master``) and one per rollout worker (without it), then per sync calls prepare -> build_topology ->
init_process_group -> send_weights / receive_weights -> finalize. Every trainer rank sends its share of
each tensor (no rank-0 funnel); each rollout worker stages the whole update and hands it to verl's server
adapter only after every sender committed, so a failed sync leaves vLLM's weights whole (cost: one staged
copy of the weights on the rollout host). Same-host only: on several hosts `build_topology` refuses.
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

from ring_ext_astate.shm_transport import Meta, ShmReceiver, ShmSender, SyncError, _meta

logger = logging.getLogger("ring_ext")


@dataclass(frozen=True)
class AStateOptions:
    slots: int = 4  # buckets in flight per sender: bounds shared memory to slots x slot size
    slot_megabytes: int = 16  # capped by verl's update_weights_bucket_megabytes
    timeout_s: float = 120.0  # every wait of a sync; a dead peer ends the sync with an error after this
    verify: Literal["first", "always", "never"] = "first"  # bit-exact digest check of the assembled weights

    def __post_init__(self) -> None:
        if self.slots < 1 or self.slot_megabytes < 1 or self.timeout_s <= 0:
            raise ValueError(f"astate options need slots >= 1, slot_megabytes >= 1, timeout_s > 0: {self}")
        if self.verify not in ("first", "always", "never"):
            raise ValueError(f"astate verify must be 'first', 'always' or 'never', got {self.verify!r}")


@CheckpointEngineRegistry.register("astate")
class AStateCheckpointEngine(CheckpointEngine):
    def __init__(self, bucket_size: int, is_master: bool | None = None, **options: Any) -> None:
        try:
            self.options = AStateOptions(**options)
        except TypeError as e:
            known = ", ".join(AStateOptions.__dataclass_fields__)
            raise TypeError(f"astate engine_kwargs: {e}; known options: {known}") from None
        self.sender_side = is_master is not None  # verl passes is_master to trainer ranks only
        self.slot_bytes = min(bucket_size, self.options.slot_megabytes << 20)
        self.syncs = 0
        self.layout: list[Meta] | None = None
        self.peer: ShmSender | ShmReceiver | None = None

    def prepare(self) -> dict[str, Any]:
        # the peer (its shared memory, sockets, staging buffers) lives across syncs: fresh memory would
        # page-fault on every byte of every sync; it is rebuilt only after a failed sync
        o = self.options
        if self.peer is None and self.sender_side:
            self.peer = ShmSender(0, 1, self.slot_bytes, o.slots, o.timeout_s)  # rank set in init_process_group
        elif self.peer is None:
            self.peer = ShmReceiver(0, o.timeout_s)
        return {"host": socket.gethostname(), "sender": self.sender_side, **self.peer.address()}

    @classmethod
    def build_topology(cls, actor_wg_world_size: int, rollout_world_size: int, metadata: list[dict]):
        hosts = {m["host"] for m in metadata}
        if len(hosts) > 1:
            raise ValueError(f"astate moves weights through shared memory on one host; workers span {sorted(hosts)}")
        senders, receivers = metadata[:actor_wg_world_size], metadata[actor_wg_world_size:]
        if not all(m["sender"] for m in senders) or any(m["sender"] for m in receivers):
            raise ValueError("astate: expected trainer ranks first, then rollout workers, in verl's metadata")
        addrs = [m["address"] for m in receivers]
        actor = {"rank": list(range(actor_wg_world_size)), "world": [actor_wg_world_size] * actor_wg_world_size,
                 "peers": [addrs] * actor_wg_world_size}
        rollout = {"rank": list(range(rollout_world_size)), "world": [actor_wg_world_size] * rollout_world_size,
                   "peers": [senders] * rollout_world_size}
        return actor, rollout

    def init_process_group(self, rank: int, world: int, peers: list) -> None:
        assert self.peer is not None, "prepare() must run before init_process_group()"
        self.peer.rank = rank
        if isinstance(self.peer, ShmSender):
            self.peer.world = world
        self.peer.connect(peers)

    def _verify(self) -> bool:
        return self.options.verify == "always" or (self.options.verify == "first" and self.syncs == 0)

    async def send_weights(self, weights: Iterable[tuple[str, torch.Tensor]], global_steps: int | None = None):
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
        }

    async def receive_weights(self, global_steps: int | None = None) -> AsyncGenerator[tuple[str, torch.Tensor], None]:
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

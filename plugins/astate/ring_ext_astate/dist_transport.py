"""torch.distributed transport of the AState-like weight sync: the bucket bytes travel point to point through a
process group of its own (gloo), for senders and receivers on different hosts. No verl import.

Same protocol as `shm_transport` (balanced byte shares, bounded ring of buckets per sender, xxh3 checksum per
bucket, coverage and optional bit-exact digests, all-or-nothing commit with versions), only the data path
differs: instead of a shared-memory slot, a sender announces a bucket on the control channel (ZeroMQ over TCP)
and `isend`s its bytes to every receiver, which `recv`s them into a private buffer with a timeout. Per pair of
ranks torch.distributed delivers in order, and a receiver takes a sender's buckets in the order it announced
them, so announcement and bytes always match.

The group is a standalone `ProcessGroupGloo` over a TCPStore (`gloo_group`), not torch's default group: the
trainer ranks already have one (FSDP's) that the rollout workers are not part of. A dead peer breaks the group;
the caller builds a new one before the next sync (`group` may be set after construction: the control address is
exchanged first, as verl's engine protocol does in `prepare`).
"""

from __future__ import annotations

import datetime
import socket
from typing import Any

import torch
import torch.distributed as dist

from ring_ext_astate.errors import SyncError
from ring_ext_astate.shm_transport import ShmReceiver, ShmSender, _Channel


def free_port(host: str = "") -> int:
    """A TCP port free on `host` now (for a TCPStore that binds it a moment later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def gloo_group(host: str, port: int, rank: int, world: int, timeout_s: float) -> dist.ProcessGroup:
    """Rank `rank` of a new `world`-rank gloo group whose TCPStore is served by rank 0 at host:port."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    return dist.ProcessGroupGloo(store, rank, world, timeout)


def _address(peer: DistSender | DistReceiver) -> dict[str, Any]:
    return {"address": peer.chan.address, **({"group_rank": peer.group.rank()} if peer.group is not None else {})}


class DistSender(ShmSender):
    def __init__(self, rank: int, world: int, slot_bytes: int, n_slots: int = 4, timeout_s: float = 60.0, *,
                 host: str = "127.0.0.1", group: dist.ProcessGroup | None = None) -> None:
        self.rank, self.world, self.slot_bytes, self.timeout_s = rank, world, slot_bytes, timeout_s
        self.group, self.shms = group, []
        self.chan = _Channel(tcp_host=host)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8) for _ in range(n_slots)]
        self.inflight: dict[int, list[dist.Work]] = {}  # slot -> its isends, waited before the slot is reused

    def address(self) -> dict[str, Any]:
        return _address(self)

    def connect(self, receivers: list[dict[str, Any]]) -> None:  # type: ignore[override]
        self.chan.connect([r["address"] for r in receivers])
        self.n_recv, self.dst = len(receivers), [r["group_rank"] for r in receivers]

    def _publish(self, version: int, slot: int, used: int, extents: list) -> None:
        for work in self.inflight.pop(slot, []):  # acked earlier, so already delivered: returns at once
            work.wait()
        super()._publish(version, slot, used, extents)
        self.inflight[slot] = [self.group.send([self.slots[slot][:used]], dst, 0) for dst in self.dst]

    def close(self) -> None:
        self.chan.close()
        self.slots, self.inflight = [], {}


class DistReceiver(ShmReceiver):
    drain_on_failure = True

    def __init__(self, rank: int, timeout_s: float = 60.0, *, host: str = "127.0.0.1",
                 group: dist.ProcessGroup | None = None) -> None:
        self.rank, self.timeout_s, self.group = rank, timeout_s, group
        self.chan = _Channel(tcp_host=host)
        self.pool: dict = {}
        self.buffers: dict[int, torch.Tensor] = {}  # per sender, grown to the largest bucket and reused

    def address(self) -> dict[str, Any]:
        return _address(self)

    def connect(self, senders: list[dict[str, Any]]) -> None:
        self.chan.connect([s["address"] for s in senders])
        self.src = [s["group_rank"] for s in senders]
        self.slots = [[] for _ in senders]  # one entry per sender: the base class counts senders by it

    def _fetch(self, sender: int, slot: int, used: int) -> torch.Tensor:
        buf = self.buffers.get(sender)
        if buf is None or buf.numel() < used:
            buf = self.buffers[sender] = torch.empty(used, dtype=torch.uint8)
        work = self.group.recv([buf[:used]], self.src[sender], 0)
        try:
            work.wait(datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as e:  # gloo raises on timeout or on a peer that went away
            raise self._fail(f"bucket bytes from sender {sender} did not arrive: {e}") from None
        return buf


__all__ = ["DistReceiver", "DistSender", "SyncError", "gloo_group"]

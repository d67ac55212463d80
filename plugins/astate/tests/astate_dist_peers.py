"""Peer processes for the torch.distributed transport tests: senders and receivers, each a real gloo rank."""

from __future__ import annotations

import os
from multiprocessing import Queue

import torch
import torch.distributed as dist
from astate_peers import make_weights
from ring_ext_astate.dist_transport import DistReceiver, DistSender, SyncError


class _FaultyDistSender(DistSender):
    """One injected fault: the bytes corrupted after the checksum was taken, or the process dying."""

    fault = ""

    def _broadcast(self, msg: tuple) -> None:
        super()._broadcast(msg)
        if msg[0] == "bucket" and self.fault == "corrupt":
            self.slots[msg[3]][0] ^= 0xFF  # after the checksum, before the isend: corrupted on the way
            self.fault = ""
        if msg[0] == "bucket" and self.fault == "die":
            os._exit(17)  # announced a bucket whose bytes never come


def peer_main(role: str, idx: int, n_send: int, n_recv: int, port: int, inq: Queue, outq: Queue,
              slot_bytes: int, timeout_s: float) -> None:
    torch.set_num_threads(1)
    rank = idx if role == "send" else n_send + idx
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n_send + n_recv)
    if role == "send":
        peer: DistSender | DistReceiver = _FaultyDistSender(idx, n_send, slot_bytes, n_slots=2, timeout_s=timeout_s)
    else:
        peer = DistReceiver(idx, timeout_s=timeout_s)
    outq.put(("address", role, idx, peer.address()))
    peer.connect(inq.get())
    for version, seed, fault, verify in iter(inq.get, None):
        try:
            if isinstance(peer, DistSender):
                peer.fault = fault if idx == n_send - 1 else ""
                stats = peer.send(make_weights(seed).items(), version, verify=verify)
                outq.put(("send", idx, "ok", stats.bytes_moved))
            else:
                outq.put(("recv", idx, "ok", dict(peer.receive(version, verify=verify))))
        except SyncError as e:
            outq.put((role, idx, "error", str(e)))
    peer.close()
    dist.destroy_process_group()

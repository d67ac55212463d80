"""Peer processes for the torch.distributed transport tests: senders and receivers, each a real gloo rank."""

from __future__ import annotations

import os
from multiprocessing import Queue
from typing import NamedTuple

import torch
from astate_peers import make_weights
from ring_ext_astate.messages import Bucket
from ring_ext_astate.dist_transport import DistReceiver, DistSender, SyncError, gloo_group


class _FaultyDistSender(DistSender):
    """One injected fault: the bytes corrupted after the checksum was taken, or the process dying."""

    fault = ""

    def _broadcast(self, msg: NamedTuple) -> None:
        super()._broadcast(msg)
        if isinstance(msg, Bucket) and self.fault == "corrupt":
            self.slots[msg.slot][0] ^= 0xFF  # after the checksum, before the isend: corrupted on the way
            self.fault = ""
        if isinstance(msg, Bucket) and self.fault == "die":
            os._exit(17)  # announced a bucket whose bytes never come


def peer_main(role: str, idx: int, n_send: int, n_recv: int, port: int, inq: Queue, outq: Queue,
              slot_bytes: int, timeout_s: float) -> None:
    torch.set_num_threads(1)
    rank = idx if role == "send" else n_send + idx
    # the transport's own group, as the engine builds it; no default torch.distributed group exists here
    group = gloo_group("127.0.0.1", port, rank, n_send + n_recv, timeout_s=60)
    if role == "send":
        peer: DistSender | DistReceiver = _FaultyDistSender(idx, n_send, slot_bytes, n_slots=2, timeout_s=timeout_s,
                                                            group=group)
    else:
        peer = DistReceiver(idx, timeout_s=timeout_s, group=group)
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

"""Sender processes for the shared-memory transport tests (spawned: each is a real, separate process)."""

from __future__ import annotations

import os
from multiprocessing import Queue

import torch
from ring_ext_astate.shm_transport import ShmSender, SyncError, _meta


def make_weights(seed: int) -> dict[str, torch.Tensor]:
    """Odd sizes on purpose: tensors larger than a slot, smaller than the sender count, fp32 and bf16."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed": (97, 33), "layers.0.qkv": (3, 41, 17), "layers.0.norm": (3,), "lm_head": (257, 31)}
    out = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    out["layers.0.qkv"] = out["layers.0.qkv"].to(torch.bfloat16)
    return out


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _FaultySender(ShmSender):
    """Injects one fault into the real transport: memory corruption after checksumming, or death."""

    fault = ""

    def _broadcast(self, msg: tuple) -> None:
        if msg[0] == "bucket" and self.fault == "corrupt":
            self.slots[msg[3]][0] ^= 0xFF  # flipped in shared memory after the checksum was taken
            self.fault = ""
        super()._broadcast(msg)
        if msg[0] == "bucket" and self.fault == "die":
            os._exit(17)  # killed mid-sync: the receivers got part of this rank's buckets


def sender_main(rank: int, world: int, slot_bytes: int, inq: Queue, outq: Queue, timeout_s: float) -> None:
    torch.set_num_threads(1)
    sender = _FaultySender(rank, world, slot_bytes, n_slots=2, timeout_s=timeout_s)
    outq.put(("address", rank, sender.address()))
    sender.connect(inq.get())
    for version, seed, fault, verify in iter(inq.get, None):
        sender.fault = fault if rank == world - 1 else ""
        weights = make_weights(seed)
        if fault == "shrunk":  # the trainer's model no longer matches the rollout's
            weights["embed"] = weights["embed"][:-1]
        manifest = [_meta(n, t) for n, t in weights.items()]
        try:
            stats = sender.send(weights.items(), version, verify=verify, manifest=manifest)
            outq.put(("ok", rank, stats.bytes_moved, stats.buckets))
        except SyncError as e:
            outq.put(("error", rank, str(e), 0))
    sender.close()

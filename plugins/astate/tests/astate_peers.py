"""Real sender processes and an in-process receiver fleet for the one-host transport tests (shared memory, CUDA IPC).

Senders are spawned processes (CUDA IPC handles cannot be opened by the process that made them); receivers are
threads of the test process, each with its own sockets."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from multiprocessing import Queue
from typing import NamedTuple

import torch
from ring_ext_astate.messages import Bucket, Chunk
from ring_ext_astate.shm_transport import ShmReceiver, ShmSender, SyncError, _meta

SLOT = 1024  # small slots: every tensor spans several buckets and the 2-slot ring wraps many times
TIMEOUT = 15.0  # generous: on 2 shared cores a spawned sender's first message can take seconds


def make_weights(seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Odd sizes on purpose: tensors larger than a slot, smaller than the sender count, fp32 and bf16."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed": (97, 33), "layers.0.qkv": (3, 41, 17), "layers.0.norm": (3,), "lm_head": (257, 31)}
    out = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    out["layers.0.qkv"] = out["layers.0.qkv"].to(torch.bfloat16)
    return {n: t.to(device) for n, t in out.items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def _transport(kind: str) -> tuple[type[ShmSender], type[ShmReceiver], str]:
    if kind == "cuda":
        from ring_ext_astate.cuda_transport import CudaIpcReceiver, CudaIpcSender

        return CudaIpcSender, CudaIpcReceiver, "cuda"
    if kind == "direct":
        from ring_ext_astate.direct_transport import DirectShmReceiver, DirectShmSender

        return DirectShmSender, DirectShmReceiver, "cpu"
    return ShmSender, ShmReceiver, "cpu"


def _faulty(base: type[ShmSender]) -> type[ShmSender]:
    class FaultySender(base):  # type: ignore[misc, valid-type]
        """Injects one fault into the real transport: memory corruption after checksumming, or death."""

        fault = ""

        def _broadcast(self, msg: NamedTuple) -> None:
            if isinstance(msg, Bucket) and self.fault == "corrupt":
                self.slots[msg.slot][0] ^= 0xFF  # flipped in the shared slot after the checksum was taken
                if self.slots[msg.slot].is_cuda:
                    torch.cuda.synchronize()
                self.fault = ""
            if isinstance(msg, Chunk) and self.fault == "corrupt":  # direct: flipped in every receiver's arena
                (name, _, _), a, _ = msg.extents[0]
                for arena, offsets in self.arenas:
                    arena[offsets[name] + a] ^= 0xFF
                self.fault = ""
            super()._broadcast(msg)
            if isinstance(msg, (Bucket, Chunk)) and self.fault == "die":
                os._exit(17)  # killed mid-sync: the receivers got part of this rank's buckets

    return FaultySender


def sender_main(rank: int, world: int, inq: Queue, outq: Queue, kind: str) -> None:
    torch.set_num_threads(1)
    sender_cls, _, device = _transport(kind)
    sender = _faulty(sender_cls)(rank, world, SLOT, n_slots=2, timeout_s=TIMEOUT)
    outq.put(("address", rank, sender.address()))
    sender.connect(inq.get())
    for version, seed, fault, verify in iter(inq.get, None):
        sender.fault = fault if rank == world - 1 else ""
        weights = make_weights(seed, device)
        if fault == "shrunk":  # the trainer's model no longer matches the rollout's
            weights["embed"] = weights["embed"][:-1]
        manifest = None if fault == "no_manifest" else [_meta(n, t) for n, t in weights.items()]
        try:
            stats = sender.send(weights.items(), version, verify=verify, manifest=manifest)
            outq.put(("ok", rank, stats.bytes_moved, stats.buckets))
        except SyncError as e:
            outq.put(("error", rank, str(e), 0))
    sender.close()


class Fleet:
    """`world` sender processes and `n_recv` receivers over the `kind` transport ('shm', 'direct' or 'cuda')."""

    def __init__(self, world: int, n_recv: int, kind: str = "shm") -> None:
        ctx = mp.get_context("spawn")
        self.out, self.ins = ctx.Queue(), [ctx.Queue() for _ in range(world)]
        self.procs = [ctx.Process(target=sender_main, args=(r, world, self.ins[r], self.out, kind))
                      for r in range(world)]
        for p in self.procs:
            p.start()
        addrs = dict(self.out.get(timeout=120)[1:] for _ in range(world))
        self.receivers = [_transport(kind)[1](r, timeout_s=TIMEOUT) for r in range(n_recv)]
        for q in self.ins:
            q.put([r.address()["address"] for r in self.receivers])
        for r in self.receivers:
            r.connect([addrs[s] for s in range(world)])

    def sync(self, version: int, seed: int, fault: str = "", verify: bool = True, expected=None):
        for q in self.ins:
            q.put((version, seed, fault, verify))
        results: list = [None] * len(self.receivers)

        def run(i: int) -> None:
            try:
                results[i] = self.receivers[i].receive(version, expected=expected, verify=verify)
            except SyncError as e:
                results[i] = e

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(self.receivers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if fault == "die":  # the last rank exits mid-sync and never reports: wait for its exit, not for a report
            # (under load it may still be exiting when the receivers give up; counted alive, it cost a 35 s wait)
            self.procs[-1].join(TIMEOUT)
            assert self.procs[-1].exitcode is not None, "the sender told to die mid-sync is still running"
        alive = [p for p in self.procs if p.is_alive() or p.exitcode == 0]
        senders = [self.out.get(timeout=2 * TIMEOUT + 5) for _ in alive]
        return results, sorted(senders)

    def close(self) -> None:
        for q, p in zip(self.ins, self.procs):
            if p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=30)
        for r in self.receivers:
            r.close()

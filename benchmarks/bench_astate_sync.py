"""Weight-sync bandwidth on one host: `astate` vs verl's built-in CPU path vs a plain memory copy, side by side.

Reproduce: `python benchmarks/bench_astate_sync.py [--gib 0.5 2 --senders 2 4 --repeats 3]` (~2 min at 0.5+2 GiB
on 2 cores; `--gib 8` needs ~20 GiB of RAM). Same bytes for all three (bf16 matrices of `--tensor-mib` each):
- memcpy: one in-process `dst.copy_(src)` of every tensor into preallocated tensors (the physical limit);
- verl built-in: verl 0.9.1's `BucketedWeightSender` -> `BucketedWeightReceiver` over shared memory, one
  sender process -> this process copying each bucket into the destination (what the `naive` backend does to
  push weights into vLLM when CUDA IPC is unavailable, i.e. on CPU);
- astate: N sender processes -> this process through `ShmReceiver`, then the staged tensors copied into the
  destination (the all-or-nothing apply), `verify="never"` after a first verified sync.
Senders yield views of one reused source buffer (like FSDP's gather buffer), so memory stays ~2x the size.
Prints GB/s and ratios; writes benchmarks/results/astate_sync.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

try:
    import ring_ext_astate  # noqa: F401
except ImportError:  # a source checkout without the plugin installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "astate"))

from ring_ext_astate.shm_transport import ShmReceiver, ShmSender

OUT = Path(__file__).resolve().parent / "results"


def _names(gib: float, tensor_mib: int) -> list[str]:
    return [f"layers.{i}.weight" for i in range(max(1, int(gib * 1024 / tensor_mib)))]


def _source(tensor_mib: int) -> torch.Tensor:
    return torch.randn((tensor_mib << 20) // 2).to(torch.bfloat16)


def _weights(names: list[str], src: torch.Tensor):
    return ((n, src) for n in names)


def _astate_sender(rank: int, world: int, names: list[str], tensor_mib: int, slot_mib: int, q, reply) -> None:
    torch.set_num_threads(1)  # one core per process: spinning OpenMP workers would steal the peer's core
    s = ShmSender(rank, world, slot_mib << 20, n_slots=4, timeout_s=300)
    reply.put((rank, s.address()))
    s.connect(q.get())
    src = _source(tensor_mib)
    for version, verify in iter(q.get, None):
        s.send(_weights(names, src), version, verify=verify)
    s.close()


def _verl_sender(handle: str, names: list[str], tensor_mib: int, bucket_mib: int, q) -> None:
    from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightSender

    torch.set_num_threads(1)
    src = _source(tensor_mib)
    for _ in iter(q.get, None):
        asyncio.run(BucketedWeightSender(handle, bucket_mib, use_shm=True).async_send_weights(_weights(names, src)))


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Transfers run one torch thread per process: with more, OpenMP workers spin on the cores that the
    peer processes need (measured here: 0.13 vs 2.75 GB/s for 2 MiB slots)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bench_memcpy(names: list[str], tensor_mib: int, dst: dict[str, torch.Tensor]) -> float:
    src = _source(tensor_mib)
    t0 = time.perf_counter()
    for n, t in _weights(names, src):
        dst[n].copy_(t)
    return time.perf_counter() - t0


def bench_verl(names, tensor_mib, dst, repeats: int, bucket_mib: int) -> list[float]:
    from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightReceiver

    ctx, handle = mp.get_context("spawn"), f"ipc:///tmp/ring-ext-bench-{uuid.uuid4().hex}.sock"
    q = ctx.Queue()
    p = ctx.Process(target=_verl_sender, args=(handle, names, tensor_mib, bucket_mib, q))
    p.start()

    def apply(weights, is_last) -> None:
        for n, t in weights:
            dst[n].copy_(t)

    times = []
    for i in range(repeats + 1):
        q.put(i)
        t0 = time.perf_counter()
        BucketedWeightReceiver(handle, torch.device("cpu"), use_shm=True).receive_weights(apply)
        times.append(time.perf_counter() - t0)
    q.put(None)
    p.join()
    return times[1:]  # the first round pays process start and imports


def bench_astate(names, tensor_mib, dst, repeats: int, senders: int, slot_mib: int) -> list[float]:
    ctx = mp.get_context("spawn")
    qs, reply = [ctx.Queue() for _ in range(senders)], ctx.Queue()
    procs = [ctx.Process(target=_astate_sender, args=(r, senders, names, tensor_mib, slot_mib, qs[r], reply))
             for r in range(senders)]
    for p in procs:
        p.start()
    addrs = dict(reply.get() for _ in range(senders))
    recv = ShmReceiver(0, timeout_s=300)
    for q in qs:
        q.put([recv.address()["address"]])
    recv.connect([addrs[r] for r in range(senders)])
    times = []
    for version in range(1, repeats + 2):
        verify = version == 1
        for q in qs:
            q.put((version, verify))
        t0 = time.perf_counter()
        for n, t in recv.receive(version, verify=verify).items():
            dst[n].copy_(t)
        times.append(time.perf_counter() - t0)
    for q in qs:
        q.put(None)
    for p in procs:
        p.join()
    recv.close()
    return times[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, nargs="+", default=[0.5, 2.0], help="weight sizes to sync (GiB)")
    ap.add_argument("--senders", type=int, nargs="+", default=[1, 2, 4], help="astate sender process counts")
    ap.add_argument("--repeats", type=int, default=3, help="timed syncs per case (after one warm-up)")
    ap.add_argument("--tensor-mib", type=int, default=64, help="size of each weight tensor")
    ap.add_argument("--slot-mib", type=int, default=16, help="astate slot size (4 slots per sender)")
    ap.add_argument("--verl-bucket-mib", type=int, default=512, help="verl sender bucket (BucketedWeightSender default)")
    args = ap.parse_args()
    rows = []
    for gib in args.gib:
        names = _names(gib, args.tensor_mib)
        nbytes = len(names) * (args.tensor_mib << 20)
        dst = {n: torch.zeros((args.tensor_mib << 20) // 2, dtype=torch.bfloat16) for n in names}  # pre-faulted
        gbps = lambda ts: nbytes / min(ts) / 1e9  # noqa: E731  best of the repeats: the least disturbed run
        row = {"gib": gib, "memcpy_gbps": gbps([bench_memcpy(names, args.tensor_mib, dst) for _ in range(3)])}
        with _threads(1):
            row["memcpy_1thread_gbps"] = gbps([bench_memcpy(names, args.tensor_mib, dst) for _ in range(3)])
            row["verl_gbps"] = gbps(bench_verl(names, args.tensor_mib, dst, args.repeats, args.verl_bucket_mib))
            for n in args.senders:
                row[f"astate{n}_gbps"] = gbps(bench_astate(names, args.tensor_mib, dst, args.repeats, n,
                                                           args.slot_mib))
        rows.append(row)
        limit = max(row["memcpy_gbps"], row["memcpy_1thread_gbps"])
        cells = "  ".join(f"astate x{n}: {row[f'astate{n}_gbps']:.2f} GB/s "
                          f"({row[f'astate{n}_gbps'] / limit:.0%} of memcpy, "
                          f"{row[f'astate{n}_gbps'] / row['verl_gbps']:.2f}x verl)" for n in args.senders)
        print(f"{gib:>4} GiB  memcpy {row['memcpy_gbps']:.2f} GB/s (1 thread {row['memcpy_1thread_gbps']:.2f})  verl {row['verl_gbps']:.2f} GB/s  {cells}")
    OUT.mkdir(exist_ok=True)
    (OUT / "astate_sync.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    _plot(rows, args.senders)


def _plot(rows: list[dict], senders: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["memcpy_gbps", "verl_gbps", *(f"astate{n}_gbps" for n in senders)]
    labels = ["memcpy (limit)", "verl built-in (shm)", *(f"astate, {n} senders" for n in senders)]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(keys)
    for i, (k, lab) in enumerate(zip(keys, labels)):
        ax.bar([j + i * width for j in range(len(rows))], [r[k] for r in rows], width, label=lab)
    ax.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(rows))], [f"{r['gib']} GiB" for r in rows])
    ax.set_ylabel("GB/s (best of repeats)")
    ax.set_title("Weight sync on one host, 2 cores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "astate_sync.png", dpi=120)


if __name__ == "__main__":
    main()

"""The GPU writer's copy under sleep mode, torch only: a worker pulls a trainer's exported weights through an IPC view
into virtual-memory-backed parameters, before and after a sleep that replaces their pages.

What it stands for (docs/astate.md, "GPU"): vLLM's weights live in CuMem allocations (cuMemCreate/cuMemMap) whose
virtual addresses survive sleep and wake-up while the physical pages are replaced, and legacy CUDA IPC handles
cannot be exported from such memory (vLLM issue #45611). So the writer runs inside the worker: the trainer exports
its (ordinary, cudaMalloc'd) buffers, the worker opens them once and copies into its own parameters. Here:
- the "trainer" process allocates the source and exports it with `torch.multiprocessing.reductions.reduce_tensor`
  (legacy CUDA IPC on a GPU; shared memory on CPU);
- the "worker" process allocates its destination with `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` (torch's
  cuMemCreate/cuMemMap-backed segments, the same kind of memory as vLLM's CuMem pool), opens the view, and copies;
- it tries the other direction too (exporting a handle of the vm-backed destination), recording whether this torch
  can, which is the fact the design rests on;
- "sleep": the worker frees its destination, returns the pages (`empty_cache` unmaps expandable segments) and
  allocates it again (new pages, often at the same virtual address, as CuMem's wake-up does), then pulls again
  through the view it opened before: the trainer's memory did not move, so the view stays valid; the bytes are
  checked each time.
Prints GB/s of each pull and the memcpy of the same bytes inside the worker; writes <out>/gpu_ipc_check.json.

    python benchmarks/gpu_ipc_check.py --device cuda --gib 0.5 2      # on the GPU host (scripts/gpu_check.sh)
    python benchmarks/gpu_ipc_check.py --device cpu --gib 0.05        # the same protocol on CPU (a dry run)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import torch
from torch.multiprocessing.reductions import reduce_tensor


def digest(t: torch.Tensor) -> int:
    """Wrapping int64 sum of the bytes' 8-byte words, computed where they live (a torn or missed copy changes it)."""
    return int(t.view(torch.int64).sum().item())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def trainer(device: str, nbytes: int, to_worker: mp.Queue, from_worker: mp.Queue) -> None:
    src = torch.randint(-2**62, 2**62, (nbytes // 8,), dtype=torch.int64, device=device)
    _sync(device)
    to_worker.put((reduce_tensor(src), digest(src)))
    from_worker.get()  # keep the source alive until the worker is done with it


def timed_copy(dst: torch.Tensor, src: torch.Tensor, device: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def worker(device: str, nbytes: int, repeats: int, to_worker: mp.Queue, from_worker: mp.Queue,
           results: mp.Queue) -> None:
    (rebuild, args), want = to_worker.get()
    view = rebuild(*args)  # opened once, kept across the sleep
    out: dict = {"gib": nbytes / 2**30}
    dst = torch.empty(nbytes // 8, dtype=torch.int64, device=device)
    out["pull_gbps"] = nbytes / timed_copy(dst, view, device, repeats) / 1e9
    out["pull_bytes_ok"] = digest(dst) == want
    local = torch.empty_like(dst)
    out["memcpy_gbps"] = nbytes / timed_copy(local, dst, device, repeats) / 1e9
    del local
    try:  # the other direction: a handle of the worker's vm-backed destination, for a trainer-side writer
        reduce_tensor(dst)
        out["export_vm_backed"] = "ok"
    except Exception as e:  # noqa: BLE001  (the message is the finding)
        out["export_vm_backed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    address = dst.data_ptr()
    del dst  # "sleep": the worker's pages go back
    if device == "cuda":
        torch.cuda.empty_cache()
    dst = torch.empty(nbytes // 8, dtype=torch.int64, device=device)  # "wake-up": new pages
    dst.fill_(0)
    out["same_address_after_wake"] = dst.data_ptr() == address
    out["pull_after_wake_gbps"] = nbytes / timed_copy(dst, view, device, repeats) / 1e9
    out["pull_after_wake_bytes_ok"] = digest(dst) == want
    from_worker.put(True)
    results.put(out)


def run(device: str, gib: float, repeats: int) -> dict:
    nbytes = int(gib * 2**30) // 8 * 8
    ctx = mp.get_context("spawn")
    to_worker, from_worker, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    env = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    t = ctx.Process(target=trainer, args=(device, nbytes, to_worker, from_worker))
    t.start()  # the trainer's allocator: torch's default (cudaMalloc segments)
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # the worker's: cuMemCreate/cuMemMap
    w = ctx.Process(target=worker, args=(device, nbytes, repeats, to_worker, from_worker, results))
    w.start()
    if env is None:
        os.environ.pop("PYTORCH_CUDA_ALLOC_CONF")
    else:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = env
    out = results.get(timeout=600)
    w.join(60)
    t.join(60)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--gib", type=float, nargs="+", default=[0.5, 2.0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu for the dry run)")
    rows = [run(args.device, g, args.repeats) for g in args.gib]
    print("GiB   pull GB/s  after wake  memcpy GB/s  bytes ok  export of vm-backed memory")
    for r in rows:
        print(f"{r['gib']:<5.2f} {r['pull_gbps']:9.1f}  {r['pull_after_wake_gbps']:10.1f}  {r['memcpy_gbps']:11.1f}  "
              f"{r['pull_bytes_ok'] and r['pull_after_wake_bytes_ok']!s:8}  {r['export_vm_backed']}")
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.out / "gpu_ipc_check.json"
    name.write_text(json.dumps({"device": args.device, "torch": torch.__version__, "rows": rows,
                                "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}, indent=1))
    print(f"wrote {name}")


if __name__ == "__main__":
    main()

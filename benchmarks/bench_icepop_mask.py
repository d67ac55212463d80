"""Micro-benchmark of the IcePop/K-Pop/TIS token weights against naive exp-then-mask and verl's IcePop weights.

Reproduce from the repo root (CPU, about a minute on 2 cores; `--quick` for a few seconds):

    python benchmarks/bench_icepop_mask.py

Times, in one process and on the same inputs, at B x T in {8x1024, 32x4096, 64x8192}:
  naive         k = exp(train - infer); w = k * ((k >= alpha) & (k <= beta))   (the bug-prone baseline)
  icepop        ring_ext_icepop.weights.mismatch_weights(kind="icepop")
  kpop          mismatch_weights(kind="kpop")   (binary KL in float64, both directions)
  kpop_fp32     the same with kpop_precision=float32
  tis           mismatch_weights(kind="tis")
  icepop+metrics mismatch_weights + mismatch_metrics (like-for-like with verl, whose call always computes metrics)
  verl_icepop   verl.trainer.ppo.rollout_corr_helper.compute_rollout_correction_weights(
                    log_ratio, response_mask, rollout_is="token", rollout_is_threshold="alpha_beta")  (if importable)
Each time is the median over 15 interleaved rounds (torch.utils.benchmark.Timer, methods rotated each round, warm-up
call first) of the mean time per call; ratio = time / naive time. One torch thread by
default (`--threads`): on a shared 2-core box, two intra-op threads mostly measure the scheduler (a 35 us kernel took
2.3 ms with 2 threads under load).
Then, with log-ratios of +1e4, -1e4 and -inf injected, reports whether each method's weights contain NaN/inf.
Writes benchmarks/results/icepop_mask.json and benchmarks/results/icepop_mask.png.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
from torch.utils.benchmark import Timer
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
try:
    import ring_ext_icepop  # noqa: F401
except ImportError:  # plain checkout, plugin not installed
    sys.path.insert(0, str(ROOT / "plugins" / "icepop"))
from ring_ext_icepop.metrics import mismatch_metrics  # noqa: E402
from ring_ext_icepop.variants import IcePop, make_variant  # noqa: E402
from ring_ext_icepop.weights import mismatch_weights  # noqa: E402

ALPHA, BETA = 0.5, 5.0
KPOP32 = make_variant("kpop", precision="float32")
SIZES = [(8, 1024), (32, 4096), (64, 8192)]
QUICK_SIZES = [(8, 1024), (16, 2048)]
Method = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def naive(train: torch.Tensor, infer: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    k = torch.exp(train - infer)
    return k * ((k >= ALPHA) & (k <= BETA)) * mask


def ours(kind: str) -> Method:
    cfg = IcePop(alpha=ALPHA, beta=BETA) if kind == "icepop" else make_variant(kind)
    return lambda train, infer, mask: mismatch_weights(train, infer, mask, cfg).weight


def ours_with_metrics(train: torch.Tensor, infer: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = mismatch_weights(train, infer, mask, IcePop(alpha=ALPHA, beta=BETA))
    mismatch_metrics(w, mask, train_logp=train)
    return w.weight


def verl_method() -> tuple[Method | None, str]:
    try:
        from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights
    except Exception as exc:  # verl absent or broken: the rest of the benchmark still stands
        return None, f"verl_icepop skipped: {type(exc).__name__}: {exc}"

    def run(train: torch.Tensor, infer: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights, _ = compute_rollout_correction_weights(
            train - infer, mask.float(), rollout_is="token", rollout_is_threshold=f"{ALPHA}_{BETA}"
        )
        return weights

    note = "verl_icepop: token-level IcePop of compute_rollout_correction_weights; its time includes its metrics"
    return run, note


def make_batch(b: int, t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    infer = -torch.rand(b, t, generator=g) * 6  # sampled-token log-probs
    train = infer + torch.randn(b, t, generator=g) * 0.4  # bf16-vs-fp32-like mismatch, a few % outside the band
    lengths = torch.randint(t // 4, t + 1, (b, 1), generator=g)
    mask = torch.arange(t)[None, :] < lengths  # right padding
    return train, infer, mask


def inject(train: torch.Tensor, infer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    train, infer = train.clone(), infer.clone()
    train[0, 0], infer[0, 0] = 0.0, -1e4  # log k = +1e4: exp overflows to inf
    train[0, 1], infer[0, 1] = -1e4, 0.0  # log k = -1e4
    train[0, 2] = -math.inf  # log k = -inf (a log-prob of -inf from the trainer)
    return train, infer


def interleaved_medians(
    methods: dict[str, Method], args: tuple[torch.Tensor, ...], budget_s: float
) -> dict[str, float]:
    """Median seconds per call of each method, sampled in rotating rounds so that load drifting on a shared
    machine hits every method alike (back-to-back blocks would charge it to whichever ran at the time)."""
    timers = {name: Timer(stmt="fn(*args)", globals={"fn": fn, "args": args}) for name, fn in methods.items()}
    rounds = 15
    number = {}
    for name, timer in timers.items():  # warm-up and calibration: one sample ~ budget / rounds
        per_call = timer.timeit(1).mean
        number[name] = max(1, int(budget_s / rounds / max(per_call, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            samples[name].append(timers[name].timeit(number[name]).mean)
    return {name: statistics.median(values) for name, values in samples.items()}


def plot(results: list[dict], methods: list[str], path: Path, where: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({tuple(r["size"]) for r in results}, key=lambda s: s[0] * s[1])
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, method in enumerate(methods):
        ratios = [next(r["ratio"] for r in results if tuple(r["size"]) == s and r["method"] == method) for s in sizes]
        ax.bar([j + (i - (len(methods) - 1) / 2) * width for j in range(len(sizes))], ratios, width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(sizes)), [f"{b}x{t}" for b, t in sizes])
    ax.set_xlabel("B x T")
    ax.set_ylabel("time / naive time")
    ax.set_title(f"Token mismatch weights, {where}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} and shorter timing")
    parser.add_argument(
        "--min-run-time", type=float, default=None, help="seconds of timing per method and size (0.8, quick 0.1)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--no-verl", action="store_true", help="skip verl's IcePop even if importable")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the kernels at real sizes (--sizes)")
    parser.add_argument("--sizes", type=str, nargs="+", help="B x T cases as BxT, e.g. 512x16384")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = QUICK_SIZES if args.quick else SIZES
    if args.sizes:
        sizes = [tuple(int(x) for x in s.lower().split("x")) for s in args.sizes]
    dev = torch.device(args.device)
    stem = "icepop_mask" if dev.type == "cpu" else f"icepop_mask_{dev.type}"
    min_run_time = args.min_run_time or (0.1 if args.quick else 0.8)

    methods: dict[str, Method] = {
        "naive": naive,
        "icepop": ours("icepop"),
        "kpop": ours("kpop"),
        "kpop_fp32": lambda train, infer, mask: mismatch_weights(train, infer, mask, KPOP32).weight,
        "tis": ours("tis"),
        "icepop+metrics": ours_with_metrics,
    }
    notes: list[str] = []
    verl_fn, note = (None, "verl_icepop skipped: --no-verl") if args.no_verl else verl_method()
    notes.append(note)
    if verl_fn is not None:
        methods["verl_icepop"] = verl_fn
    print(note)

    results: list[dict] = []
    for b, t in tqdm(sizes, desc="timing", unit="size"):
        medians = interleaved_medians(methods, tuple(x.to(dev) for x in make_batch(b, t)), min_run_time)
        for name, seconds in medians.items():
            results.append({"size": [b, t], "method": name, "median_s": seconds, "ratio": seconds / medians["naive"]})

    train, infer, mask = make_batch(4, 256, seed=1)
    train, infer, mask = (x.to(dev) for x in (*inject(train, infer), mask))
    nan_flags = {name: bool((~torch.isfinite(fn(train, infer, mask))).any()) for name, fn in methods.items()}

    cpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    print(f"\ntorch {torch.__version__}, threads={torch.get_num_threads()}, {cpu}; ratio = time / naive time")
    print(f"{'B x T':>10} " + " ".join(f"{m:>15}" for m in methods))
    for b, t in sizes:
        row = {r["method"]: r for r in results if r["size"] == [b, t]}
        print(f"{f'{b}x{t}':>10} " + " ".join(f"{row[m]['ratio']:>9.2f}x" + " " * 6 for m in methods))
        print(f"{'':>10} " + " ".join(f"{row[m]['median_s'] * 1e3:>12.3f} ms" for m in methods))
    print("NaN/inf in weights with injected log k = +1e4, -1e4, -inf:")
    print("  " + ", ".join(f"{m}: {'YES' if flag else 'no'}" for m, flag in nan_flags.items()))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "icepop_mask",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": cpu,
        "quick": args.quick,
        "alpha": ALPHA,
        "beta": BETA,
        "timing_budget_s_per_cell": min_run_time,
        "rounds": 15,
        "sizes": [list(s) for s in sizes],
        "methods": list(methods),
        "results": results,
        "nan_or_inf_with_injected_log_ratios": nan_flags,
        "notes": notes,
    }
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    threads = f", {torch.get_num_threads()} threads" if dev.type == "cpu" else ""
    plot(results, list(methods)[1:], args.out_dir / f"{stem}.png", f"{cpu} (torch {torch.__version__}{threads})")
    print(f"wrote {args.out_dir / stem}.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

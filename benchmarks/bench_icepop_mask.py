"""Micro-benchmark of the mismatch weights (every ring-ext variant) against naive exp-then-mask and against verl's
own rollout correction for IcePop and the sequence-level modes.

Reproduce from the repo root (CPU, about two minutes on 2 cores; `--quick` for a few seconds):

    python benchmarks/bench_icepop_mask.py

Times, in one process and on the same inputs, at B x T in {8x1024, 32x4096, 64x8192}:
  naive          k = exp(train - infer); w = k * ((k >= alpha) & (k <= beta))   (the bug-prone baseline)
  <variant>      ring_ext_icepop.weights.mismatch_weights with the variant at its default knobs: icepop, kpop (binary
                 KL in float64), kpop_fp32 (kpop_precision=float32), tis, seq_geo, seq_max, seq_max_icepop,
                 seq_geo_tis; icepop_lag: IcePop with bands per version lag {0: [0.5, 5], 1: [0.3, 8]} on lags 0-2
  <variant>+metrics  the weights + mismatch_metrics (like-for-like with verl, whose calls always compute metrics)
  verl_<variant> verl.trainer.ppo.rollout_corr_helper on the same log-probs, as its trainer calls it (log k computed
                 inside; the response mask given as the float tensor its batch holds):
                   verl_icepop          compute_rollout_correction_weights(rollout_is="token", threshold "0.5_5.0")
                   verl_seq_geo         compute_rollout_rejection_mask(rollout_rs="seq_mean_k1", "1/beta_1/alpha")
                                        (RolloutCorrectionConfig.decoupled_geo_rs; verl's k1 is -log k)
                   verl_seq_max         token IS weights "lo_hi" x rejection rollout_rs="seq_max_k2" at (log hi)^2/2
                   verl_seq_max_icepop  token IS weights "alpha_beta" x the same seq_max_k2 rejection
                   verl_seq_geo_tis     token IS weights (cap) x seq_mean_k1 (decoupled_geo_rs_token_tis)
                 (both sides equal on finite log-ratios: tests/test_sequence_variants.py)
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
from ring_ext_icepop.variants import IcePop, Variant, describe, make_variant  # noqa: E402
from ring_ext_icepop.weights import mismatch_weights  # noqa: E402

ALPHA, BETA = 0.5, 5.0
LAG_BANDS = {0: [0.5, 5.0], 1: [0.3, 8.0]}
SIZES = [(8, 1024), (32, 4096), (64, 8192)]
QUICK_SIZES = [(8, 1024), (16, 2048)]
# every method takes (train, infer, mask, lag, mask as float) and returns its per-token weights
Method = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
VARIANTS: dict[str, Variant] = {
    "icepop": IcePop(alpha=ALPHA, beta=BETA), "kpop": make_variant("kpop"),
    "kpop_fp32": make_variant("kpop", precision="float32"), "tis": make_variant("tis"),
    "icepop_lag": IcePop(lag_bands=LAG_BANDS), **{kind: make_variant(kind) for kind in
                                                   ("seq_geo", "seq_max", "seq_max_icepop", "seq_geo_tis")}}
WITH_METRICS = ("icepop", "seq_geo", "seq_max", "seq_max_icepop", "seq_geo_tis")  # each timed against verl's


def naive(train: torch.Tensor, infer: torch.Tensor, mask: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
    k = torch.exp(train - infer)
    return k * ((k >= ALPHA) & (k <= BETA)) * mask


def ours(variant: Variant, metrics: bool = False) -> Method:
    def run(train: torch.Tensor, infer: torch.Tensor, mask: torch.Tensor, lag: torch.Tensor, *_: torch.Tensor
            ) -> torch.Tensor:
        w = mismatch_weights(train, infer, mask, variant, lag=lag)
        if metrics:
            mismatch_metrics(w, mask, train_logp=train)
        return w.weight

    return run


def verl_methods() -> tuple[dict[str, Method], str]:
    """verl's rollout correction equal to each ring-ext variant in WITH_METRICS, at that variant's default knobs."""
    try:
        from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights as is_weights
        from verl.trainer.ppo.rollout_corr_helper import compute_rollout_rejection_mask as rejection
    except Exception as exc:  # verl absent or broken: the rest of the benchmark still stands
        return {}, f"verl skipped: {type(exc).__name__}: {exc}"
    geo, geo_tis = make_variant("seq_geo"), make_variant("seq_geo_tis")
    seq_max, seq_max_icepop = make_variant("seq_max"), make_variant("seq_max_icepop")
    assert math.isclose(seq_max.lo * seq_max.hi, 1) and math.isclose(seq_max_icepop.lo * seq_max_icepop.hi, 1)

    def corrected(is_spec: str | float | None, rs: str | None, rs_spec: str | float | None) -> Method:
        def run(train: torch.Tensor, infer: torch.Tensor, _m: torch.Tensor, _l: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
            log_ratio = train - infer
            weights = mask if is_spec is None else is_weights(log_ratio, mask, "token", is_spec)[0]
            return weights if rs is None else weights * rejection(log_ratio, mask, rs, rs_spec)[0]

        return run

    return {
        "verl_icepop": corrected(f"{ALPHA}_{BETA}", None, None),
        "verl_seq_geo": corrected(None, "seq_mean_k1", f"{1 / geo.beta}_{1 / geo.alpha}"),
        "verl_seq_max": corrected(f"{seq_max.lo}_{seq_max.hi}", "seq_max_k2", math.log(seq_max.hi) ** 2 / 2),
        "verl_seq_max_icepop": corrected(f"{seq_max_icepop.alpha}_{seq_max_icepop.beta}", "seq_max_k2",
                                         math.log(seq_max_icepop.hi) ** 2 / 2),
        "verl_seq_geo_tis": corrected(geo_tis.cap, "seq_mean_k1", f"{1 / geo_tis.beta}_{1 / geo_tis.alpha}"),
    }, "verl_*: verl 0.9.1's rollout_corr_helper functions; their time includes their metrics"


def make_batch(b: int, t: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    infer = -torch.rand(b, t, generator=g) * 6  # sampled-token log-probs
    train = infer + torch.randn(b, t, generator=g) * 0.4  # bf16-vs-fp32-like mismatch, a few % outside the band
    lengths = torch.randint(t // 4, t + 1, (b, 1), generator=g)
    mask = torch.arange(t)[None, :] < lengths  # right padding
    # C3PO++-like lags: a response's first tokens decoded up to two versions back, the rest by the current weights
    resumed_at = (torch.rand(b, 1, generator=g) * lengths).long()
    lag = torch.where(torch.arange(t)[None, :] < resumed_at, torch.randint(1, 3, (b, 1), generator=g), 0)
    return train, infer, mask, lag, mask.float()


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


def _bars(ax, sizes: list[tuple[int, int]], series: dict[str, list[float]], ylabel: str, title: str) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(sizes))], values, width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(sizes)), [f"{b}x{t}" for b, t in sizes])
    ax.set_xlabel("B x T")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)


def plot(results: list[dict], pairs: dict[str, str], path: Path, where: str) -> None:
    """Left: each variant's weights against naive; right: each variant with its diagnostics against verl's equal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({tuple(r["size"]) for r in results}, key=lambda s: s[0] * s[1])
    cell = {(tuple(r["size"]), r["method"]): r for r in results}
    fig, axes = plt.subplots(1, 2 if pairs else 1, figsize=(14 if pairs else 9, 4.5), squeeze=False)
    weights = [m for m in VARIANTS if (sizes[0], m) in cell]
    _bars(axes[0][0], sizes, {m: [cell[s, m]["ratio"] for s in sizes] for m in weights}, "time / naive time",
          "weights M(k), time against naive exp-then-mask")
    if pairs:
        ratios = {ours: [cell[s, ours]["median_s"] / cell[s, verl]["median_s"] for s in sizes]
                  for ours, verl in pairs.items()}
        _bars(axes[0][1], sizes, ratios, "time / verl's time",
              "with all diagnostics, against verl's rollout correction")
    fig.suptitle(f"Mismatch weights, {where}", fontsize=11)
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
    parser.add_argument("--no-verl", action="store_true", help="skip verl's rollout correction even if importable")
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

    methods: dict[str, Method] = {"naive": naive, **{name: ours(v) for name, v in VARIANTS.items()},
                                  **{f"{name}+metrics": ours(VARIANTS[name], metrics=True) for name in WITH_METRICS}}
    verl, note = ({}, "verl skipped: --no-verl") if args.no_verl else verl_methods()
    methods |= verl
    pairs = {f"{name}+metrics": f"verl_{name}" for name in WITH_METRICS if f"verl_{name}" in methods}
    notes = [note]
    print(note)

    results: list[dict] = []
    for b, t in tqdm(sizes, desc="timing", unit="size"):
        medians = interleaved_medians(methods, tuple(x.to(dev) for x in make_batch(b, t)), min_run_time)
        for name, seconds in medians.items():
            results.append({"size": [b, t], "method": name, "median_s": seconds, "ratio": seconds / medians["naive"]})

    train, infer, mask, lag, mask_f = make_batch(4, 256, seed=1)
    batch = tuple(x.to(dev) for x in (*inject(train, infer), mask, lag, mask_f))
    nan_flags = {name: bool((~torch.isfinite(fn(*batch))).any()) for name, fn in methods.items()}

    cpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    cell = {(tuple(r["size"]), r["method"]): r for r in results}
    print(f"\ntorch {torch.__version__}, threads={torch.get_num_threads()}, {cpu}; ms per call (time / naive time)")
    print(f"{'':>22} " + " ".join(f"{f'{b}x{t}':>19}" for b, t in sizes))
    for m in methods:
        print(f"{m:>22} " + " ".join(f"{cell[s, m]['median_s'] * 1e3:>9.3f} ms ({cell[s, m]['ratio']:5.2f}x)"
                                     for s in map(tuple, sizes)))
    for ours_name, verl_name in pairs.items():
        ratios = [cell[s, ours_name]["median_s"] / cell[s, verl_name]["median_s"] for s in map(tuple, sizes)]
        print(f"{ours_name} / {verl_name}: " + ", ".join(f"{r:.2f}" for r in ratios))
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
        "variants": {name: describe(v) for name, v in VARIANTS.items()},
        "timing_budget_s_per_cell": min_run_time,
        "rounds": 15,
        "sizes": [list(s) for s in sizes],
        "methods": list(methods),
        "results": results,
        "ours_over_verl": {f"{o} / {v}": [cell[tuple(s), o]["median_s"] / cell[tuple(s), v]["median_s"]
                                          for s in sizes] for o, v in pairs.items()},
        "nan_or_inf_with_injected_log_ratios": nan_flags,
        "notes": notes,
    }
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    threads = f", {torch.get_num_threads()} threads" if dev.type == "cpu" else ""
    plot(results, pairs, args.out_dir / f"{stem}.png", f"{cpu} (torch {torch.__version__}{threads})")
    print(f"wrote {args.out_dir / stem}.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Arms table, criteria verdicts and figures for the weight-driven gap study (issue 18).

python -m experiments.mismatch.gapreport
# -> results/gap/{arms,criteria}.md, docs/figures/mismatch_gap_*.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from experiments.mismatch.plot import FIGURES, smooth

OUT = Path(__file__).parent / "results" / "gap"
FIG_METRICS = (
    "reward",
    "heldout_acc",
    "kl_mean",
    "probe_kl_mean",
    "kl_max",
    "k_lt_0.5",
    "k_gt_2",
    "k_gt_5",
    "masked_frac",
    "masked_entropy",
    "grad_norm",
    "grad_norm_router",
    "weight_norm",
    "weight_absmax",
    "entropy",
    "logp_mean",
    "router_flips",
)
LABELS = {
    "reward": "train reward",
    "heldout_acc": "held-out exact accuracy (fp32 trainer, greedy)",
    "kl_mean": "gap: exact KL(copy || trainer), mean",
    "probe_kl_mean": "gap on the frozen probe set",
    "kl_max": "gap: exact KL, max over tokens",
    "k_lt_0.5": "fraction of tokens with k < 0.5",
    "k_gt_2": "fraction of tokens with k > 2",
    "k_gt_5": "fraction of tokens with k > 5",
    "masked_frac": "fraction of tokens masked by the loss",
    "masked_entropy": "entropy of masked tokens",
    "grad_norm": "grad norm (pre-clip)",
    "grad_norm_router": "router-gate grad norm",
    "entropy": "token entropy (trainer)",
    "logp_mean": "trainer log-prob of sampled tokens",
    "router_flips": "router top-2 flips (copy vs trainer)",
}
LOG_Y = {"kl_mean", "probe_kl_mean", "kl_max", "grad_norm", "grad_norm_router"}


def collapse_step(
    m: dict[str, list[float]], signal: bool = True, window: int = 20, patience: int = 50
) -> int | None:
    """The pre-registered collapse: R20 < 0.5 x its best so far, not back within `patience` steps, and (with
    `signal`) the 20-step gap >= 10x its first-20 mean or the 20-step grad-norm median >= 5x the first-20
    one. R20 exists from step `window - 1` on: the first steps' shorter means are not a "best"."""
    r = smooth(m["reward"], window)
    gap, gn = np.asarray(m["kl_mean"]), np.asarray(m["grad_norm"])
    gap0, gn0 = gap[:window].mean(), np.median(gn[:window])
    for t in range(window - 1, len(r)):
        level = 0.5 * r[window - 1 : t + 1].max()
        if r[t] >= level or (r[t + 1 : t + 1 + patience] >= level).any():
            continue
        lo = t + 1 - window
        if (
            not signal
            or gap[lo : t + 1].mean() >= 10 * max(gap0, 1e-30)
            or np.median(gn[lo : t + 1]) >= 5 * gn0
        ):
            return t
    return None


def log_slope(gap: list[float]) -> tuple[float, float]:
    """Least-squares slope of log(gap) on the step, and its 95% half-width (per step)."""
    y = np.log(np.maximum(np.asarray(gap), 1e-30))
    x = np.arange(len(y), dtype=float)
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    se = np.sqrt(resid.var(ddof=2) / ((x - x.mean()) ** 2).sum())
    return float(b), float(1.96 * se)


ORDER = ("vanilla@fp32", "icepop@fp32", "vanilla@", "tis@", "icepop@", "icepop_0.5_2@", "vanilla+replay@")


def load(out: Path) -> dict[str, dict[str, Any]]:
    """Runs by name, ceiling first, then the mismatched arms in the issue's order, seeds last."""
    runs = [json.loads(f.read_text()) for f in out.glob("*@*.json")]

    def key(r: dict[str, Any]) -> tuple[int, int, str]:
        return (r["seed"], next(i for i, o in enumerate(ORDER) if r["name"].startswith(o)), r["name"])

    return {r["name"]: r for r in sorted(runs, key=key)}


def criteria(runs: dict[str, dict[str, Any]], out: Path, ckpt_dir: Path) -> str:
    """The verdicts of the criteria written in docs/mismatch.md before the runs."""
    import torch

    def find(prefix: str, seed: int = 0) -> dict[str, Any] | None:
        return next((r for r in runs.values() if r["name"].startswith(prefix) and r["seed"] == seed), None)

    lines = []
    for r in runs.values():
        lines.append(f"- collapse, {r['name']}: {collapse_step(r['metrics'])}")
    ceil = find("vanilla@fp32")
    van = next(
        (
            r
            for r in runs.values()
            if r["name"].startswith("vanilla@") and r["mode"] != "fp32" and r["seed"] == 0
        ),
        None,
    )
    ice = next(
        (
            r
            for r in runs.values()
            if r["name"].startswith("icepop@") and r["mode"] != "fp32" and r["seed"] == 0
        ),
        None,
    )
    if ceil and van and ice:
        dv, di = 100 * (final_acc(ceil) - final_acc(van)), 100 * (final_acc(ceil) - final_acc(ice))
        lines.append(
            f"- degradation: vanilla {dv:+.1f} points under the ceiling (needs >= 10), IcePop [0.5, 5] "
            f"{di:+.1f} (needs <= 3): {'MET' if dv >= 10 and di <= 3 else 'not met'}"
        )
        b, hw = log_slope(van["metrics"]["kl_mean"])
        ratio = np.mean(van["metrics"]["kl_mean"][-50:]) / np.mean(ice["metrics"]["kl_mean"][-50:])
        bias = out / "bias.json"
        pos = None
        if bias.is_file():
            pts = json.loads(bias.read_text())["points"]
            pos = all(r["positive_1"] and r["positive_4"] for rows in pts.values() for r in rows)
        met = b - hw > 0 and ratio >= 2 and bool(pos)
        lines.append(
            f"- compounding: log-gap slope {100 * b:+.3f} ± {100 * hw:.3f} per 100 steps, last-50 gap "
            f"ratio vanilla/IcePop {ratio:.2f} (needs >= 2), bias test positive: {pos}: "
            f"{'MET' if met else 'not met'}"
        )
    icef = find("icepop@fp32")
    if ceil and icef:
        n = icef["steps"]
        same = all(ceil["metrics"][k][:n] == icef["metrics"][k] for k in ("reward", "grad_norm", "kl_mean"))
        a, c = ckpt_dir / f"{ceil['name']}_step50.pt", ckpt_dir / f"{icef['name']}.pt"
        diff = "n/a"
        if a.is_file() and c.is_file():
            wa, wc = torch.load(a), torch.load(c, weights_only=False)["model"]
            diff = f"{max(float((wa[k] - wc[k]).abs().max()) for k in wa):.3g}"
        lines.append(
            f"- IcePop with the fp32 copy vs vanilla, {n} steps: per-step reward/grad norm/gap identical: "
            f"{same}; max |parameter difference| at step 50: {diff}"
        )
    return "\n".join(lines) + "\n"


def final_acc(r: dict[str, Any]) -> float:
    return float(np.mean([e["heldout_acc"] for e in sorted(r["evals"], key=lambda e: e["step"])[-2:]]))


def arms_table(runs: dict[str, dict[str, Any]]) -> str:
    head = (
        "| arm | steps | held-out acc: start / best / final | train reward: first 20 / last 20 "
        "| collapse step "
        "| gap (KL) first 20 / last 50 | log-gap slope per 100 steps | probe gap start / end "
        "| masked (per mille) | k<0.5 / k>5 (per mille) | grad norm median | router flips (%) | runtime (s) |"
    )
    lines = [head, "|---" * 13 + "|"]
    for name, r in runs.items():
        m, ev = r["metrics"], sorted(r["evals"], key=lambda e: e["step"])
        acc = [e["heldout_acc"] for e in ev]
        b, hw = log_slope(m["kl_mean"]) if r["mode"] != "fp32" else (0.0, 0.0)
        c = collapse_step(m)
        lines.append(
            f"| {name} | {r['steps']} | {acc[0]:.3f} / {max(acc):.3f} / {final_acc(r):.3f} "
            f"| {np.mean(m['reward'][:20]):.3f} / {np.mean(m['reward'][-20:]):.3f} "
            f"| {c if c is not None else 'none'} "
            f"| {np.mean(m['kl_mean'][:20]):.2e} / {np.mean(m['kl_mean'][-50:]):.2e} "
            f"| {100 * b:+.3f} ± {100 * hw:.3f} "
            f"| {ev[0]['probe_kl_mean']:.2e} / {ev[-1]['probe_kl_mean']:.2e} "
            f"| {1e3 * np.mean(m['masked_frac']):.2f} "
            f"| {1e3 * np.mean(m['k_lt_0.5']):.2f} / {1e3 * np.mean(m['k_gt_5']):.2f} "
            f"| {np.median(m['grad_norm']):.2f} "
            f"| {100 * np.mean(m['router_flips']):.2f} | {r['runtime_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict[str, Any]], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, r) in enumerate(runs.items()):
        if metric in ("heldout_acc", "probe_kl_mean"):
            ev = sorted(r["evals"], key=lambda e: e["step"])
            ax.plot(
                [e["step"] for e in ev], [e[metric] for e in ev], "o-", ms=3, color=f"C{i % 10}", label=name
            )
        else:
            ax.plot(smooth(r["metrics"][metric]), color=f"C{i % 10}", lw=1.4, label=name)
    ax.set_xlabel("GRPO step")
    evals = metric in ("heldout_acc", "probe_kl_mean")
    ax.set_ylabel(LABELS.get(metric, metric) + ("" if evals else " (10-step mean)"), fontsize=8)
    if metric in LOG_Y:
        ax.set_yscale("log")
    ax.set_title("tiny Qwen3-MoE GRPO, rollout copy re-derived from the current weights", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--figures", type=Path, default=FIGURES)
    p.add_argument("--ckpt-dir", type=Path, help="default: $RING_EXT_CACHE/mismatch-gap")
    p.add_argument("--name", default="gap", help="figures: docs/figures/mismatch_<name>_<metric>.png")
    p.add_argument("--metrics", nargs="+", default=list(FIG_METRICS))
    args = p.parse_args(argv)
    runs = load(args.out)
    md = arms_table(runs)
    (args.out / "arms.md").write_text(md)
    print(md)
    from ring_ext.tiny import default_cache_dir

    verdicts = criteria(runs, args.out, args.ckpt_dir or default_cache_dir() / "mismatch-gap")
    (args.out / "criteria.md").write_text(verdicts)
    print(verdicts)
    for metric in args.metrics:
        path = args.figures / f"mismatch_{args.name}_{metric.replace('.', '')}.png"
        plot(runs, metric, path)
        print(path)


if __name__ == "__main__":
    main()

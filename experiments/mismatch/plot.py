"""Figures and the results table from the JSON files `run.py` wrote (no training here).

    python -m experiments.mismatch.plot experiments/mismatch/results/m0.5            # every figure + the table
    python -m experiments.mismatch.plot experiments/mismatch/results/m0.5 --metrics reward   # one figure

One PNG per metric in docs/figures/ (mismatch_<name>_<metric>.png, name = first directory's name or --name): per
method the mean over seeds of a 10-step moving average, seeds as thin lines. The markdown table goes to
<first directory>/table_<name>.md.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

FIGURES = Path(__file__).resolve().parents[2] / "docs" / "figures"
WINDOW = 10
LABELS = {
    "reward": "reward (mean over the batch)", "grad_norm": "grad norm (pre-clip)", "kl_mean": "train/infer KL, mean",
    "kl_max": "train/infer KL, max over tokens", "masked_frac": "fraction of tokens masked by the loss",
    "masked_entropy": "entropy of masked tokens", "oob_frac": "fraction of tokens with k outside [0.5, 5]",
    "entropy": "token entropy (trainer)",
}  # fmt: skip
LOG_Y = {"grad_norm", "kl_mean", "kl_max"}


def load(*dirs: Path, methods: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Runs grouped by method; with several directories the label also names the knob (`vanilla @m=0.0`)."""
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for d in dirs:
        for f in sorted(d.glob("*.json")):
            r = json.loads(f.read_text())
            if "metrics" in r and (methods is None or r["method"] in methods):
                label = r["method"] if len(dirs) == 1 else f"{r['method']} @m={r['config']['mismatch']}"
                runs[label].append(r)
    order = ("vanilla", "tis", "icepop", "kpop")  # the paper's order; same colours in every figure set
    return dict(sorted(runs.items(), key=lambda kv: (order.index(kv[0].split(":")[0].split(" ")[0]), kv[0])))


def smooth(x: list[float], window: int = WINDOW) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    c = np.cumsum(np.insert(a, 0, 0.0))
    out = np.empty_like(a)
    for i in range(len(a)):  # trailing mean over the last `window` steps (shorter at the start)
        lo = max(0, i + 1 - window)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def collapse_step(reward: list[float], drop: float = 0.5, warmup: int = 20) -> int | None:
    """First step (after `warmup`) where the 10-step mean reward falls below `drop` x its best value so far."""
    s = smooth(reward)
    best = -np.inf
    for i, v in enumerate(s):
        best = max(best, v)
        if i >= warmup and v < drop * best:
            return i
    return None


def plot_metric(runs: dict[str, list[dict[str, Any]]], metric: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (method, rs) in enumerate(runs.items()):
        color = f"C{i % 10}"
        curves = [smooth(r["metrics"][metric]) for r in rs]
        n = min(len(c) for c in curves)
        for c in curves:
            ax.plot(c[:n], color=color, alpha=0.25, lw=0.8)
        ax.plot(np.mean([c[:n] for c in curves], 0), color=color, lw=1.8, label=f"{method} ({len(rs)} seeds)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel(LABELS.get(metric, metric))
    if metric in LOG_Y:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(runs: dict[str, list[dict[str, Any]]], last: int = 20) -> str:
    """Markdown: final reward (last `last` steps), collapse step per seed, masked fraction, KL, grad norm."""
    head = (
        "| method | seeds | final reward | collapse step | masked (per mille) | k outside [0.5,5] (per mille) "
        "| entropy: masked / all tokens | train/infer KL mean | KL max (worst step) | grad norm (mean / max) |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for method, rs in runs.items():
        m = [r["metrics"] for r in rs]

        def avg(key: str, m: list[dict[str, list[float]]] = m) -> float:
            return float(np.mean([np.mean(x[key]) for x in m]))

        finals = [float(np.mean(x["reward"][-last:])) for x in m]
        collapses = [collapse_step(x["reward"]) for x in m]
        col = ", ".join("none" if c is None else str(c) for c in collapses)
        gmax = max(float(np.max(x["grad_norm"])) for x in m)
        kmax = max(float(np.max(x["kl_max"])) for x in m)
        # mean entropy of masked tokens over the steps that masked any (0.0 marks "none" in the curves)
        ment = [e for x in m for e, f in zip(x["masked_entropy"], x["masked_frac"], strict=True) if f > 0]
        ent = f"{np.mean(ment):.2f}" if ment else "-"
        lines.append(
            f"| {method} | {len(rs)} | {np.mean(finals):.3f} ± {np.std(finals):.3f} | {col} "
            f"| {1000 * avg('masked_frac'):.2f} | {1000 * avg('oob_frac'):.2f} | {ent} / {avg('entropy'):.2f} "
            f"| {avg('kl_mean'):.4f} "
            f"| {kmax:.2f} | {avg('grad_norm'):.2f} / {gmax:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, nargs="+", help="directories of run JSON files (run.py --out)")
    p.add_argument("--name", help="figure/table name (default: the first directory's name)")
    p.add_argument("--metrics", nargs="+", default=list(LABELS))
    p.add_argument("--methods", nargs="+", help="only these methods (default: all found)")
    p.add_argument("--figures", type=Path, default=FIGURES)
    args = p.parse_args(argv)
    runs = load(*args.results, methods=args.methods)
    if not runs:
        raise SystemExit(f"no run JSON in {args.results}")
    name = args.name or args.results[0].name
    cfg = next(iter(runs.values()))[0]["config"]
    knobs = sorted({r["config"]["mismatch"] for rs in runs.values() for r in rs})
    title = (f"tiny Qwen3-MoE GRPO, mismatch knob {', '.join(map(str, knobs))} ({cfg['infer_dtype']} rollout + "
             f"router noise)\n{cfg['prompts']}x{cfg['group']} samples/step, lr {cfg['lr']}, "
             "10-step moving average")
    for metric in args.metrics:
        path = args.figures / f"mismatch_{name}_{metric}.png"
        plot_metric(runs, metric, path, title)
        print(path)
    md = table(runs)
    (args.results[0] / f"table_{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

"""Run GRPO on the tiny MoE under a controlled train/inference mismatch, for several methods and seeds.

    python -m experiments.mismatch.run --methods vanilla tis icepop icepop:0.5:2 kpop:0.02 kpop:0.1 kpop:0.5 \\
        --seeds 0 1 --steps 150 --mismatch 0.5 --out experiments/mismatch/results/m0.5     # ~18 min

Methods: vanilla (verl's PPO-clip), tis[:cap], icepop[:alpha:beta], kpop[:phi] (ring-ext-icepop losses, called
through verl's registry). One JSON per (method, seed) in --out; wandb logs offline unless WANDB_MODE says
otherwise (--no-wandb to skip). Always single-threaded torch: the numbers do not depend on the core count.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from experiments.mismatch.grpo import METRICS, GRPOConfig, GRPORun, parse_method

RESULTS = Path(__file__).parent / "results"


def run_file(out: Path, method: str, seed: int) -> Path:
    return out / f"{method.replace(':', '_')}_s{seed}.json"


def run_one(method: str, seed: int, steps: int, cfg: GRPOConfig, out: Path, use_wandb: bool,
            progress: Any = None) -> dict[str, Any]:  # fmt: skip
    from experiments.mismatch.sft import sft_policy

    torch.manual_seed(seed)
    model, tok = sft_policy()  # fresh copy of the same warmed-up weights for every run
    run = GRPORun(model, tok, method, seed, cfg)
    print(f"[mismatch] {run.describe()} seed={seed}", flush=True)  # the active loss and knobs, as verl would log
    logger = _wandb(method, seed, cfg, out) if use_wandb else None
    curves: dict[str, list[float]] = {k: [] for k in METRICS}
    start = time.time()
    for step in range(steps):
        metrics = run.step(step)
        for key, value in metrics.items():
            curves[key].append(value)
        if logger is not None:
            logger.log(metrics, step=step)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(method=method, seed=seed, reward=f"{metrics['reward']:.2f}")
    result = {
        "method": method, "seed": seed, "steps": steps, "config": vars(cfg) | {"steps": steps},
        "describe": run.describe(), "runtime_s": time.time() - start, "metrics": curves,
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    run_file(out, method, seed).write_text(json.dumps(result))
    if logger is not None:
        logger.finish()
    return result


def _wandb(method: str, seed: int, cfg: GRPOConfig, out: Path) -> Any:
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    return wandb.init(
        project="ring_ext_mismatch", name=f"{method}-s{seed}-m{cfg.mismatch}", dir=str(out),
        config=vars(cfg) | {"method": method, "seed": seed}, reinit="finish_previous",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["vanilla", "tis", "icepop", "icepop:0.5:2", "kpop:0.1"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--mismatch", type=float, default=0.5, help="router-noise std; 0 = no mismatch at all")
    p.add_argument("--infer-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="rollout-copy precision when --mismatch > 0")  # fmt: skip
    p.add_argument("--lr", type=float, default=GRPOConfig.lr)
    p.add_argument("--prompts", type=int, default=GRPOConfig.prompts)
    p.add_argument("--group", type=int, default=GRPOConfig.group)
    p.add_argument("--max-new", type=int, default=GRPOConfig.max_new)
    p.add_argument("--out", type=Path, default=RESULTS / "m0.5")
    p.add_argument("--no-wandb", action="store_true", help="skip wandb (default: offline logging under --out)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for m in args.methods:
        parse_method(m)  # fail on a typo before any run starts
    cfg = GRPOConfig(prompts=args.prompts, group=args.group, max_new=args.max_new, lr=args.lr,
                     mismatch=args.mismatch, infer_dtype=args.infer_dtype)  # fmt: skip
    from tqdm import tqdm

    start = time.time()
    with tqdm(total=len(args.methods) * len(args.seeds) * args.steps, unit="step") as bar:
        for seed in args.seeds:
            for method in args.methods:
                run_one(method, seed, args.steps, cfg, args.out, not args.no_wandb, bar)
    print(f"[mismatch] {len(args.methods) * len(args.seeds)} runs in {time.time() - start:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()

"""Issue 18: does IcePop prevent mismatch collapse when the gap comes from the current weights?

    python -m experiments.mismatch.study calibrate         # table, mode pick, prompt pool (~30 s)
    python -m experiments.mismatch.study lr --steps 150    # largest lr whose fp32-copy control holds
    python -m experiments.mismatch.study arms --steps 500  # the arms (finished arms are skipped)
    python -m experiments.mismatch.study bias              # the gradient-bias test (finite differences)
    python -m experiments.mismatch.gapreport               # tables, verdicts and figures

Results in experiments/mismatch/results/gap/ (one JSON per arm); checkpoints (to resume or extend an arm)
under $RING_EXT_CACHE/mismatch-gap/. Single-threaded torch; wandb offline unless WANDB_MODE says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from experiments.mismatch import gapdata
from experiments.mismatch.gaprun import STEP_METRICS, GapConfig, GapRun
from experiments.mismatch.run import RESULTS
from ring_ext.tiny import default_cache_dir

OUT = RESULTS / "gap"
LRS = (1e-3, 5e-4, 3e-4)
EVAL_EVERY = 25


def parse_arm(arm: str, mismatched: str) -> tuple[str, str, bool]:
    """'icepop:0.5:2@fp8' -> (method spec, copy mode, replay); '@mm' is the picked mismatched mode."""
    spec, _, mode = arm.partition("@")
    mode = mismatched if mode in ("", "mm") else mode
    replay = spec.endswith("+replay")
    return spec.removesuffix("+replay"), mode, replay


def arm_name(arm: str, mismatched: str, lr: float, seed: int) -> str:
    spec, mode, replay = parse_arm(arm, mismatched)
    return f"{spec.replace(':', '_')}{'+replay' if replay else ''}@{mode}_lr{lr:g}_s{seed}"


class Context:
    """What every arm shares: the start weights, the prompt pool, the frozen probe batch (built once)."""

    def __init__(self, out: Path) -> None:
        from experiments.mismatch.sft import sft_policy

        self.out, self.heldout = out, gapdata.HELDOUT_ROWS
        model, self.tok = sft_policy()
        self.start = {k: v.clone() for k, v in model.state_dict().items()}
        out.mkdir(parents=True, exist_ok=True)
        f = out / "pool.json"
        if not f.is_file():
            f.write_text(json.dumps({"solve_rates": gapdata.solve_rates(model, self.tok)}))
        self.pool = gapdata.pool(json.loads(f.read_text())["solve_rates"])
        self.probe = gapdata.probe_batch(model, self.tok, self.pool)
        cal = out / "calibration.json"
        self.mismatched = json.loads(cal.read_text())["picked"] if cal.is_file() else "bf16"

    def model(self) -> Any:
        from experiments.mismatch.sft import sft_policy

        model, _ = sft_policy()
        model.load_state_dict(self.start)
        return model


def run_arm(
    ctx: Any,
    arm: str,
    seed: int,
    steps: int,
    lr: float,
    use_wandb: bool = False,
    ckpt_dir: Path | None = None,
    **cfg_overrides: Any,
) -> dict[str, Any]:
    name = arm_name(arm, ctx.mismatched, lr, seed)
    out_file = ctx.out / f"{name}.json"
    if out_file.is_file() and json.loads(out_file.read_text())["steps"] >= steps:
        print(f"[gap] {name}: done ({out_file.name}), skipped", flush=True)
        return json.loads(out_file.read_text())
    spec, mode, replay = parse_arm(arm, ctx.mismatched)
    torch.manual_seed(seed)
    model = ctx.model()
    cfg = GapConfig(**{"lr": lr, "mode": mode, "replay": replay} | cfg_overrides)
    run = GapRun(model, ctx.tok, spec, seed, cfg, ctx.pool)
    ckpt = (ckpt_dir or default_cache_dir() / "mismatch-gap") / f"{name}.pt"
    state: dict[str, Any] = {
        "step": 0,
        "curves": {k: [] for k in STEP_METRICS},
        "evals": [],
        "runtime_s": 0.0,
    }
    if ckpt.is_file():  # resume (or extend a shorter run of the same arm)
        state = torch.load(ckpt, weights_only=False)
        if state.pop("config", vars(cfg)) != vars(cfg):
            raise SystemExit(f"{ckpt} was written with another config: delete it or use another --ckpt-dir")
        if state["step"] > steps:
            raise SystemExit(f"{ckpt} is at step {state['step']} > {steps}: delete it to rerun shorter")
        model.load_state_dict(state.pop("model"))
        run.opt.load_state_dict(state.pop("opt"))
        run.gen.set_state(state.pop("gen"))
    print(f"[gap] {run.describe()} seed={seed} from step {state['step']}", flush=True)
    logger = _wandb(name, cfg, ctx.out) if use_wandb else None
    start = time.time() - state["runtime_s"]
    for step in range(state["step"], steps + 1):
        if step % EVAL_EVERY == 0 or step == steps:
            ev = {"step": step, "heldout_acc": gapdata.heldout_acc(model, ctx.tok, ctx.heldout)}
            ev |= gapdata.probe_gap(model, ctx.mismatched if mode == "fp32" else mode, ctx.probe)
            state["evals"] = [e for e in state["evals"] if e["step"] != step] + [ev]
            if logger is not None:
                logger.log(ev, step=step)
        if step == steps:
            break
        metrics = run.step(step)
        for key, value in metrics.items():
            state["curves"][key].append(value)
        if logger is not None:
            logger.log(metrics, step=step)
        state["step"] = step + 1
        if (step + 1) % 10 == 0:
            el = time.time() - start
            print(
                f"[gap] {name} step {step + 1}/{steps} reward {metrics['reward']:.3f} "
                f"kl {metrics['kl_mean']:.2e}"
                f" {el / (step + 1):.2f} s/step",
                flush=True,
            )
        if (step + 1) % 50 == 0:
            _save(ckpt, state, model, run, start)
        if step + 1 == 50:  # the icepop@fp32 check compares parameters at step 50 with vanilla@fp32's
            torch.save(model.state_dict(), ckpt.with_name(f"{name}_step50.pt"))
    _save(ckpt, state, model, run, start)
    result = {
        "arm": arm,
        "name": name,
        "method": spec,
        "mode": mode,
        "replay": replay,
        "seed": seed,
        "steps": steps,
        "config": vars(cfg) | {"steps": steps},
        "describe": run.describe(),
        "runtime_s": time.time() - start,
        "metrics": state["curves"],
        "evals": state["evals"],
    }
    out_file.write_text(json.dumps(result))
    if logger is not None:
        logger.finish()
    return result


def _save(path: Path, state: dict[str, Any], model: Any, run: GapRun, start: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    full = state | {
        "config": vars(run.cfg),
        "model": model.state_dict(),
        "opt": run.opt.state_dict(),
        "gen": run.gen.get_state(),
        "runtime_s": time.time() - start,
    }
    torch.save(full, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def _wandb(name: str, cfg: GapConfig, out: Path) -> Any:
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    return wandb.init(
        project="ring_ext_mismatch_gap", name=name, dir=str(out), config=vars(cfg), reinit="finish_previous"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["calibrate", "lr", "arms", "bias"])
    p.add_argument(
        "--arms",
        nargs="+",
        default=["vanilla@fp32", "vanilla@mm", "icepop@mm", "tis@mm", "icepop:0.5:2@mm", "vanilla+replay@mm"],
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, help="default: the one `lr` picked (lr.json)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--no-wandb", action="store_true")
    p.add_argument("--ckpt-dir", type=Path, help="default: $RING_EXT_CACHE/mismatch-gap")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    ctx = Context(args.out)
    if args.stage == "calibrate":
        gapdata.calibration_table(ctx)
    elif args.stage == "lr":
        picked = None
        for lr in LRS:  # largest first: stop at the first that keeps its reward
            r = run_arm(ctx, "vanilla@fp32", 0, args.steps, lr, not args.no_wandb, args.ckpt_dir)
            from experiments.mismatch.gapreport import collapse_step

            c = collapse_step(r["metrics"], signal=False)
            print(f"[gap] lr {lr:g}: collapse step {c}", flush=True)
            if c is None:
                picked = lr
                break
        (args.out / "lr.json").write_text(json.dumps({"picked": picked, "steps": args.steps}))
    elif args.stage == "arms":
        lr = args.lr or json.loads((args.out / "lr.json").read_text())["picked"]
        for seed in args.seeds:
            for arm in args.arms:
                steps = 50 if arm.startswith("icepop@fp32") else args.steps
                run_arm(ctx, arm, seed, steps, lr, not args.no_wandb, args.ckpt_dir)
    else:
        from experiments.mismatch.bias import bias_report

        lr = args.lr or json.loads((args.out / "lr.json").read_text())["picked"]
        vanilla_end = default_cache_dir() / "mismatch-gap" / f"{arm_name('vanilla@mm', ctx.mismatched, lr, 0)}.pt"
        bias_report(ctx, lr, vanilla_end)
    print(f"[gap] {args.stage} done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()

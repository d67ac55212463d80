"""A finished run's figures: its main curves (`ring_ext_curves.png`) and C3PO++'s request timeline.

Where it sits: `write_report` (the summary of `ring_ext.report` and these figures, into the run folder) runs at the
end of a run (`ring_ext.run_record`) and from `ring-ext report`. The
curves are four panels of logged metrics per step: reward (`critic/score/mean`), train/infer mismatch k3 per
policy-version lag (`actor/mismatch/lag<N>/k3`), C3PO++'s budget use (`c3po/budget_used`) and the weight sync's
seconds (verl's `timing_s/update_weights`, and AState's own per-sync time). The timeline is ring-ext-c3po's plot
(`ring_ext_c3po.timeline`) of the run's `c3po_timeline.jsonl`. matplotlib with the Agg backend; no verl import.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ring_ext import report
from ring_ext.report import MISMATCH, REWARD, lags

CURVES_PNG = "ring_ext_curves.png"
TIMELINE_PNG = "c3po_timeline.png"


def _series(steps: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for s in steps:
        v = s["data"].get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(int(s["step"]))
            ys.append(float(v))
    return xs, ys


def _empty(ax: Any, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="grey")


def draw_curves(steps: Sequence[Mapping[str, Any]], syncs: Sequence[Mapping[str, Any]], out: Path) -> Path:
    """The four panels of the module docstring; a panel whose metrics the run did not log says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    (reward, k3), (budget, sync) = axes
    xs, ys = _series(steps, REWARD)
    if xs:
        reward.plot(xs, ys, marker="o")
    else:
        _empty(reward, f"no {REWARD}")
    reward.set_title(f"reward ({REWARD})", fontsize=10)

    drawn = False
    for name, key in [("all tokens", f"{MISMATCH}k3")] + [(f"lag {n}", f"{MISMATCH}lag{n}/k3") for n in lags(steps)]:
        xs, ys = _series(steps, key)
        if xs:
            k3.plot(xs, ys, marker="o", label=name)
            drawn = True
    if drawn:
        k3.legend(fontsize=8)
        if all(y > 0 for line in k3.get_lines() for y in line.get_ydata()):
            k3.set_yscale("log")
    else:
        _empty(k3, f"no {MISMATCH}* metrics: IcePop off")
    k3.set_title(f"train/infer mismatch k3 by version lag ({MISMATCH}lag<N>/k3)", fontsize=10)

    xs, ys = _series(steps, "c3po/budget_used")
    if xs:
        budget.plot(xs, ys, marker="o")
        budget.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    else:
        _empty(budget, "no c3po/* metrics: C3PO++ off")
    budget.set_title("C3PO++ budget use (c3po/budget_used, 1 = Phi)", fontsize=10)

    xs, ys = _series(steps, "timing_s/update_weights")
    if xs:
        sync.plot(xs, ys, marker="o", label="verl timing_s/update_weights")
    slowest: dict[int, float] = {}
    for r in syncs:
        if r.get("global_steps") is not None:
            step = int(r["global_steps"])
            slowest[step] = max(slowest.get(step, 0.0), float(r["seconds"]))
    if slowest:
        sync.plot(sorted(slowest), [slowest[s] for s in sorted(slowest)], marker="s", linestyle=":",
                  label="AState in-place write (slowest worker)")
    if xs or slowest:
        sync.legend(fontsize=8)
    else:
        _empty(sync, "no weight-sync timings")
    sync.set_title("weight sync (s)", fontsize=10)
    for ax in (budget, sync):
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def draw_timeline(jsonl: Path, out: Path) -> Path:
    """ring-ext-c3po's own plot of its timeline (named, as plugins are attached: the core imports no plugin)."""
    from ring_ext.patching import resolve

    load, plot = resolve("ring_ext_c3po.timeline:load"), resolve("ring_ext_c3po.timeline:plot")
    return plot(load(jsonl), out)


def draw_all(steps: Sequence[Mapping[str, Any]], syncs: Sequence[Mapping[str, Any]], timeline: Path,
             out_dir: Path) -> list[str]:
    """Both figures into `out_dir`; returns what could not be drawn and why (never raises)."""
    problems = []
    try:
        draw_curves(steps, syncs, out_dir / CURVES_PNG)
    except Exception as exc:  # a figure must never fail the run it reports on
        problems.append(f"{CURVES_PNG} not drawn: {type(exc).__name__}: {exc}")
    c3po_ran = any("c3po/budget_used" in s["data"] for s in steps)
    if timeline.is_file():
        try:
            draw_timeline(timeline, out_dir / TIMELINE_PNG)
        except ImportError as exc:
            problems.append(f"{TIMELINE_PNG} not drawn: ring-ext-c3po's plotter is not installed ({exc})")
        except Exception as exc:
            problems.append(f"{TIMELINE_PNG} not drawn: {type(exc).__name__}: {exc}")
    elif c3po_ran:
        problems.append(f"{TIMELINE_PNG} not drawn: no {timeline} (trainer.v1.c3po.timeline=false?)")
    return problems


def write_report(run_dir: Path, out_dir: Path | None = None, *, metrics: Path | None = None) -> report.Report:
    """Summarise the run in `run_dir` and draw its figures into `out_dir` (default: the run folder): writes
    ring_ext_summary.txt/.json and the PNGs. A figure that cannot be drawn is a `problems` entry, never an error."""
    out_dir = out_dir or run_dir
    steps, run, syncs = report.load_run(run_dir, metrics)
    # refuses records without a trained step
    facts = report.summarise(steps, run, syncs, run_dir=str(out_dir.absolute()))
    out_dir.mkdir(parents=True, exist_ok=True)
    problems = draw_all(report.training_steps(steps), syncs, run_dir / report.TIMELINE_JSONL, out_dir)
    elsewhere = [] if out_dir == run_dir else [f"(run folder: {run_dir.absolute()})"]
    facts["files"] = report.run_files(out_dir, (report.SUMMARY_TXT, report.SUMMARY_JSON)) + elsewhere
    text = report.render(facts) + "".join(f"NOTE: {p}\n" for p in problems)
    (out_dir / report.SUMMARY_JSON).write_text(json.dumps(facts, indent=1) + "\n")
    (out_dir / report.SUMMARY_TXT).write_text(text)
    return report.Report(text, facts, problems)

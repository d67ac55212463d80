"""`ring-ext`: list installed plugins and what they registered, the shipped recipes; run the stage pipeline;
summarise a finished run."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path


def _plugins(args: argparse.Namespace) -> int:
    import verl  # noqa: F401  (verl's entry-point loader runs ring-ext's discovery)

    from ring_ext.discovery import load_plugins

    reports = load_plugins()
    if args.json:
        print(json.dumps([asdict(r) for r in reports], indent=2))
        return 0
    if not reports:
        print("no ring-ext plugins installed (pip install plugins/<name>)")
    for report in reports:
        status = f"FAILED: {report.error}" if report.error else "ok"
        print(f"{report.name}  ({report.distribution} {report.version})  {status}")
        for reg in report.registrations:
            print(f"    {reg.kind:<18} {reg.name:<32} {reg.detail}")
    return 1 if any(r.error for r in reports) else 0


def _recipes(args: argparse.Namespace) -> int:
    from ring_ext.recipes import list_recipes

    recipes = list_recipes()
    if args.json:
        print(json.dumps([asdict(r) for r in recipes], indent=2))
        return 0
    for recipe in recipes:
        print(f"{recipe.name:<16} {recipe.summary}")
    print("\nrun one with: python -m verl.trainer.main_ppo +recipe=<name> [overrides...]")
    return 0


def _stage_overrides(items: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        stage, sep, override = item.partition(":")
        if not sep or not override:
            raise SystemExit(f"--set {item!r}: expected STAGE:KEY=VALUE, e.g. rlvr:trainer.total_training_steps=4")
        out.setdefault(stage, []).append(override)
    return out


def _pipeline(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ring_ext.pipeline import PipelineError, Stage, StageResult, run_pipeline, summary_table, total_steps

    overrides = _stage_overrides(args.set)
    bars: dict[str, tqdm] = {}

    def on_stage(stage: Stage, result: StageResult | None) -> None:
        if result is None:
            log = args.workdir / stage.name / f"{stage.name}.log"
            print(f"[{stage.name}] +recipe={stage.recipe}, log: {log}", flush=True)
            total = total_steps(stage, overrides.get(stage.name, ()))
            bars[stage.name] = tqdm(total=total, desc=stage.name, unit="step")
            return
        bar = bars.pop(stage.name, None)
        if bar is not None:
            bar.close()
        state = "done" if bar is not None else "already done, skipped"
        print(f"[{stage.name}] {state}: {result.steps} steps, {result.metric} {result.first} -> {result.last}, "
              f"model {result.model}", flush=True)

    def on_step(stage: Stage, record: dict) -> None:
        bar = bars[stage.name]
        bar.update(record["step"] - bar.n)
        if stage.metric in record["data"]:
            bar.set_postfix({stage.metric: f"{record['data'][stage.metric]:.4g}"})

    try:
        state = run_pipeline(args.name, args.workdir, overrides=overrides, model=args.model, start_at=args.start_at,
                             save_freq=args.save_freq, nproc=args.nproc, on_step=on_step, on_stage=on_stage)
    except PipelineError as exc:
        print(f"ring-ext pipeline: {exc}", file=sys.stderr)
        return 2
    print(summary_table(state))
    return 0


def _report(args: argparse.Namespace) -> int:
    from ring_ext.report import ReportError
    from ring_ext.report_figures import write_report

    try:
        report = write_report(args.run_dir, args.out, metrics=args.metrics)
    except (ReportError, OSError) as exc:
        print(f"ring-ext report: {exc}", file=sys.stderr)
        return 2
    print(report.text, end="")
    return 1 if report.problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ring-ext",
        description="Ring-1T techniques as verl plugins. Training runs through verl's own entry point: "
        "python -m verl.trainer.main_ppo +recipe=ring1t",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    plugins = sub.add_parser("plugins", help="list installed ring-ext plugins, versions and registrations")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=_plugins)
    recipes = sub.add_parser("recipes", help="list the Hydra recipes (+recipe=<name>)")
    recipes.add_argument("--json", action="store_true", help="machine-readable output")
    recipes.set_defaults(func=_recipes)
    pipeline = sub.add_parser(
        "pipeline",
        help="run the Ring-1T stages in order (SFT -> RLVR -> RLHF), handing each stage's model to the next",
        description="Runs verl's SFT trainer, then main_ppo twice, each with a ring-ext recipe; each stage starts "
        "from the previous stage's checkpoint. Rerunning with the same --workdir skips finished stages and resumes "
        "an interrupted one from its last checkpoint. Profiles: add e.g. --set rlvr:ring1t_profile/rlvr=paper.",
    )
    pipeline.add_argument("name", choices=["ring1t"], help="the pipeline")
    pipeline.add_argument("--workdir", type=Path, default=Path("runs/ring1t"),
                          help="checkpoints, logs and pipeline.json go here (default: runs/ring1t)")
    pipeline.add_argument("--set", action="append", default=[], metavar="STAGE:KEY=VALUE",
                          help="a Hydra override for one stage (sft, rlvr, rlhf); repeatable")
    pipeline.add_argument("--model", help="the first stage's starting model, an HF directory (default: the recipe's)")
    pipeline.add_argument("--from", dest="start_at", metavar="STAGE",
                          help="skip the stages before STAGE, e.g. --from rlvr --model <your SFT model>")
    pipeline.add_argument("--save-freq", type=int, default=50,
                          help="checkpoint every N steps; verl also saves at each stage's last step (default: 50)")
    pipeline.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per node for the SFT stage's torchrun")
    pipeline.set_defaults(func=_pipeline)
    report = sub.add_parser(
        "report",
        help="print a finished run's summary (IcePop, C3PO++, AState) and redraw its figures",
        description="Reads the records a run left in its folder (trainer.default_local_dir): ring_ext_metrics.jsonl "
        "(every logged step), ring_ext_run.json, ring_ext_syncs.jsonl, c3po_timeline.jsonl. Prints the summary the "
        "run printed at its end and writes ring_ext_summary.txt/.json, ring_ext_curves.png (reward, mismatch k3 per "
        "version lag, budget use, sync seconds) and c3po_timeline.png. Exit code 2: no such folder or no steps "
        "recorded; 1: a figure could not be drawn (the summary says why).",
    )
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run's trainer.default_local_dir")
    report.add_argument("--out", type=Path, help="write the summary and figures here (default: RUN_DIR)")
    report.add_argument("--metrics", type=Path, metavar="JSONL",
                        help="step records to read instead of RUN_DIR/ring_ext_metrics.jsonl, e.g. verl's file "
                        "logger's (VERL_FILE_LOGGER_PATH)")
    report.set_defaults(func=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""A finished run's summary: what IcePop, C3PO++ and AState did, from the records the run left in its folder.

Where it sits: `ring_ext.run_record` (the thin verl attachment) writes, in `trainer.default_local_dir`, every logged
step (`ring_ext_metrics.jsonl`, the format of verl's file logger), the run's technique switches (`ring_ext_run.json`)
and one line per AState in-place sync (`ring_ext_syncs.jsonl`); at the run's end
`ring_ext.report_figures.write_report` summarises and draws them, as does `ring-ext report <run dir>` for any
finished run. Every number here is a plain statistic (count, sum, mean, min, max) of the logged metrics named
beside it. No verl import, no figures.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS = "ring_ext_metrics.jsonl"
RUN = "ring_ext_run.json"
SYNCS = "ring_ext_syncs.jsonl"
SUMMARY_TXT = "ring_ext_summary.txt"
SUMMARY_JSON = "ring_ext_summary.json"
TIMELINE_JSONL = "c3po_timeline.jsonl"
TITLE = "ring-ext run summary"
MISMATCH = "actor/mismatch/"
LAG_METRICS = ("kept_frac", "masked_below_frac", "masked_above_frac", "k3")
ROLLOUT_TIMES = ("timing_s/gen", "c3po/trainer_wait_s")  # verl's generation timer; c3po's wait for the budget
REWARD = "critic/score/mean"


class ReportError(ValueError):
    """A run folder or record that cannot be summarised; the message says which file and why."""


@dataclass
class Report:
    text: str
    facts: dict[str, Any]
    problems: list[str] = field(default_factory=list)  # figures that could not be drawn, and why


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ReportError(f"{path}:{n} is not a JSON line ({exc.msg})") from exc
    return rows


def merge_steps(records: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Step records ({"step", "data"}, in the order logged) -> one record per step, by step. Records of one step
    merge (later values win); a step lower than the one before starts over from there (a resumed or restarted run
    logs its steps again), dropping the later steps recorded before it."""
    merged: dict[int, dict] = {}
    last: int | None = None
    for record in records:
        step = int(record["step"])
        if last is not None and step < last:
            for later in [s for s in merged if s > step]:
                del merged[later]
        merged.setdefault(step, {}).update(record.get("data") or {})
        last = step
    return [{"step": s, "data": merged[s]} for s in sorted(merged)]


def training_steps(steps: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The steps that trained (a validation-only record, e.g. step 0 of `val_before_train`, did not)."""
    return [dict(s) for s in steps if any(k.startswith(("actor/", "timing_s/step")) for k in s["data"])]


def values(steps: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """`key`'s logged values over `steps`, skipping steps without it and nulls (verl writes NaN and inf as null)."""
    out = []
    for s in steps:
        v = s["data"].get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def stats(xs: Sequence[float]) -> dict[str, float] | None:
    if not xs:
        return None
    return {"n": len(xs), "mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs), "sum": sum(xs)}


def lags(steps: Sequence[Mapping[str, Any]]) -> list[int]:
    """The policy-version lags that have `actor/mismatch/lag<N>/...` metrics in some step."""
    found = set()
    for s in steps:
        for key in s["data"]:
            if key.startswith(f"{MISMATCH}lag"):
                found.add(int(key[len(MISMATCH) + 3:].split("/")[0]))
    return sorted(found)


def _icepop(steps: list[dict], run: Mapping[str, Any]) -> dict[str, Any]:
    mode, logged = run.get("loss_mode"), bool(values(steps, f"{MISMATCH}kept_frac"))
    on = run.get("mismatch_loss", logged)  # the run's record says whether its loss is one of ring-ext-icepop's
    if not on:
        why = f"policy loss {mode} (actor_rollout_ref.actor.policy_loss.loss_mode)" if mode else \
            f"no {MISMATCH}* metric was logged"
        return {"on": False, "why": why}
    if not logged:
        return {"on": True, "why": f"policy loss {mode}, but no {MISMATCH}* metric was logged"}
    knobs = {k.removeprefix(f"{mode}_"): v for k, v in (run.get("policy_loss") or {}).items()
             if mode and k.startswith(f"{mode}_")}
    loss = f"{mode}({', '.join(f'{k}={v}' for k, v in knobs.items())})" if mode else "a mismatch loss"
    out: dict[str, Any] = {"on": True, "loss": loss, "steps": len(values(steps, f"{MISMATCH}kept_frac"))}
    for name in (*LAG_METRICS, "k1"):
        out[name] = stats(values(steps, f"{MISMATCH}{name}"))
    below, above = f"{MISMATCH}masked_below_frac", f"{MISMATCH}masked_above_frac"
    out["steps_masking"] = sum((s["data"].get(below) or 0) + (s["data"].get(above) or 0) > 0 for s in steps)
    out["seq_rejected_frac"] = stats(values(steps, f"{MISMATCH}seq_rejected_frac"))  # sequence variants only
    out["by_lag"] = {}
    for lag in lags(steps):
        prefix = f"{MISMATCH}lag{lag}/"
        band = [values(steps, f"{prefix}band_{end}")[-1:] for end in ("lo", "hi")]  # with per-lag bands only
        out["by_lag"][str(lag)] = {"steps": len(values(steps, f"{prefix}kept_frac")),
                                   **{name: stats(values(steps, f"{prefix}{name}")) for name in LAG_METRICS},
                                   "band": [b[0] for b in band] if all(band) else None}
    return out


# C3PO++'s rollout-phase metrics (ring_ext_c3po/phase_stats.py), logged per step as c3po/<name>
PHASE_METRICS = ("engine_occupancy", "cut_s", "reprefill_tokens", "admission_latency_s")


def _c3po(steps: list[dict], run: Mapping[str, Any]) -> dict[str, Any]:
    mode = run.get("trainer_mode")
    if not values(steps, "c3po/budget_used"):
        if mode not in (None, "c3po"):
            return {"on": False, "why": f"trainer.v1.trainer_mode={mode}"}
        return {"on": mode == "c3po", "why": f"{'trainer mode c3po, but ' if mode else ''}no c3po/* metric was logged"}
    knobs = run.get("c3po") or {}
    described = " ".join(f"{k}({sym})={knobs.get(k, 'default')}" for k, sym in
                         (("token_budget", "Phi"), ("pool_prompts", "Omega"), ("max_retention", "sigma")))
    rollout = next((k for k in ROLLOUT_TIMES if values(steps, k)), None)
    return {
        "on": True, "knobs": described, "steps": len(values(steps, "c3po/budget_used")),
        "budget_used": stats(values(steps, "c3po/budget_used")),
        "tokens_trained": sum(values(steps, "c3po/tokens_trained")),
        "trajectories_trained": sum(values(steps, "c3po/trajectories_trained")),
        "trajectories_multi_version": sum(values(steps, "c3po/trajectories_multi_version")),
        "steps_multi_version": sum(v > 0 for v in values(steps, "c3po/trajectories_multi_version")),
        "groups_purged": sum(values(steps, "c3po/groups_purged")),
        "version_lag_max": max(values(steps, "c3po/version_lag/max"), default=0.0),
        "stale_token_fraction": stats(values(steps, "c3po/stale_token_fraction")),
        "rollout_metric": rollout, "rollout_s": stats(values(steps, rollout)) if rollout else None,
        "phase": {k: stats(values(steps, f"c3po/{k}")) for k in PHASE_METRICS},
        "purged_tokens": sum(values(steps, "c3po/purged_tokens")),
    }


def _sync_facts(syncs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-sync records (one per rollout worker and sync) -> per sync: bytes summed over workers, slowest worker."""
    by_sync: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in syncs:
        by_sync.setdefault((r.get("job"), r.get("replica", 0), r["version"]), []).append(r)
    per = list(by_sync.values())
    return {
        "syncs": len(per),
        "workers": max((len(rs) for rs in per), default=0),
        "bytes_per_sync": stats([float(sum(r["bytes"] for r in rs)) for rs in per]),
        "seconds": stats([max(float(r["seconds"]) for r in rs) for rs in per]),
        "verified": sum(all(r["verified"] for r in rs) for rs in per),
        "retries": int(sum(int(r["attempts"]) - 1 for r in syncs)),
    }


def _astate(steps: list[dict], run: Mapping[str, Any], syncs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    inplace, engine = run.get("weight_transfer") == "astate", run.get("checkpoint_engine")
    timing = stats(values(steps, "timing_s/update_weights"))
    engine_bytes = stats(values(steps, "astate/bytes_per_sender"))
    if not (inplace or engine == "astate" or syncs or engine_bytes):
        why = f"weights copied by verl's {engine or 'own'} sync" + (
            " (actor_rollout_ref.rollout.engine_kwargs.vllm.weight_transfer_config is not astate)" if run else "")
        return {"on": False, "why": why, "update_weights_s": timing}
    how = "in place into the rollout workers' parameters" if inplace or syncs else "copied"
    if engine == "astate":
        how += ", through astate's checkpoint engine"
    options = run.get("astate") or run.get("astate_inplace") or {}  # the section's name in older runs' records
    out: dict[str, Any] = {"on": True, "how": how, "options": options, "update_weights_s": timing}
    if inplace or syncs:
        out |= _sync_facts(syncs)
        if not syncs:
            out["why"] = f"no per-sync record in {SYNCS} (the rollout workers could not reach the run folder)"
    if engine_bytes:
        out["engine"] = {"steps": engine_bytes["n"], "bytes_per_sender": engine_bytes,
                         "seconds": stats(values(steps, "astate/seconds"))}
    return out


def summarise(steps: Sequence[Mapping[str, Any]], run: Mapping[str, Any] | None = None,
              syncs: Sequence[Mapping[str, Any]] = (), files: Sequence[str] = (),
              run_dir: str | None = None) -> dict[str, Any]:
    """The facts of a run: `steps` (merged, one per step), `run` (its switches, `ring_ext_run.json`; None: decided
    from which metrics were logged), `syncs` (`ring_ext_syncs.jsonl`), the files in its folder."""
    run = dict(run or {})
    trained = training_steps(steps)
    if not trained:
        raise ReportError("no training step in the records (each step's metrics: {\"step\": N, \"data\": {...}})")
    reward = values(trained, REWARD)
    return {
        "run_dir": run_dir, "project": run.get("project"), "experiment": run.get("experiment"),
        "exit_code": run.get("exit_code"),
        "steps": len(trained), "first_step": trained[0]["step"], "last_step": trained[-1]["step"],
        "reward": {"metric": REWARD, "first": reward[0], "last": reward[-1], "mean": sum(reward) / len(reward)}
        if reward else None,
        "step_s": stats(values(trained, "timing_s/step")),
        "icepop": _icepop(trained, run), "c3po": _c3po(trained, run), "astate": _astate(trained, run, syncs),
        "files": list(files),
    }


def _g(x: float) -> str:
    return f"{x:.4g}"


def _pct(x: float) -> str:
    return f"{100 * x:.4g}%"


def _mib(x: float) -> str:
    return f"{x / 2**20:.4g} MiB"


def _range(s: Mapping[str, float], fmt: Any = _g) -> str:
    return f"mean {fmt(s['mean'])} (min {fmt(s['min'])}, max {fmt(s['max'])})"


def _icepop_lines(f: Mapping[str, Any]) -> list[str]:
    if not f["on"] or "loss" not in f:
        return [f"IcePop: {'on, ' if f['on'] else 'off: '}{f['why']}"]
    lines = [f"IcePop: on, {f['loss']}; per-step {MISMATCH}* averaged over {f['steps']} steps"]
    kept, below, above = f["kept_frac"], f["masked_below_frac"], f["masked_above_frac"]
    lines.append(f"  tokens kept {_pct(kept['mean'])} (min {_pct(kept['min'])}), masked below {_pct(below['mean'])}, "
                 f"masked above {_pct(above['mean'])}; steps with masked tokens: {f['steps_masking']} of {f['steps']}")
    if f["k3"]:
        lines.append(f"  train/infer KL k3 {_range(f['k3'])}")
    if f.get("seq_rejected_frac"):
        lines.append(f"  responses rejected whole (seq_rejected_frac) {_range(f['seq_rejected_frac'], _pct)}")
    for lag, d in f["by_lag"].items():
        parts = [f"{name.removesuffix('_frac').replace('masked_', '')} "
                 f"{_pct(d[name]['mean']) if name.endswith('_frac') else _g(d[name]['mean'])}"
                 for name in LAG_METRICS if d[name]]
        band = f" in band [{_g(d['band'][0])}, {_g(d['band'][1])}]" if d.get("band") else ""
        lines.append(f"  version lag {lag}: {d['steps']} steps{band}, " + ", ".join(parts))
    return lines


def _c3po_lines(f: Mapping[str, Any]) -> list[str]:
    if not f["on"] or "knobs" not in f:
        return [f"C3PO++: {'on, ' if f['on'] else 'off: '}{f['why']}"]
    lines = [f"C3PO++: on, {f['knobs']}",
             f"  budget used (c3po/budget_used) {_range(f['budget_used'])} over {f['steps']} steps; "
             f"{f['tokens_trained']:.0f} tokens trained",
             f"  trajectories spanning policy versions: {f['trajectories_multi_version']:.0f} of "
             f"{f['trajectories_trained']:.0f} trained (in {f['steps_multi_version']} of {f['steps']} steps); "
             f"groups purged: {f['groups_purged']:.0f}",
             f"  version lag: max {f['version_lag_max']:.0f}"]
    if f["stale_token_fraction"]:
        lines[-1] += f", stale tokens {_pct(f['stale_token_fraction']['mean'])} (mean of c3po/stale_token_fraction)"
    if f["rollout_s"]:
        r = f["rollout_s"]
        lines.append(f"  rollout ({f['rollout_metric']}): {_g(r['sum'])} s in all, {_range(r)} s per step")
    phase = f.get("phase") or {}
    if phase.get("engine_occupancy"):
        occ, cut = phase["engine_occupancy"], phase.get("cut_s")
        lines.append(f"  engine occupancy {_range(occ, _pct)}" + (f"; cut (crossing to engines stopped) "
                                                                   f"{_range(cut)} s" if cut else ""))
    if phase.get("reprefill_tokens"):
        lines.append(f"  tokens prefilled again after cuts {phase['reprefill_tokens']['sum']:.0f}; "
                     f"decoded then purged {f.get('purged_tokens', 0):.0f}")
    return lines


def _astate_lines(f: Mapping[str, Any]) -> list[str]:
    timing = f.get("update_weights_s")
    verl = f"verl's timing_s/update_weights {_range(timing)} s over {timing['n']} steps" if timing else ""
    if not f["on"]:
        return [f"AState: off: {f['why']}"] + ([f"  {verl}"] if verl else [])
    opts = ", ".join(f"{k}={v}" for k, v in f["options"].items())
    lines = [f"AState: on, weights {f['how']}" + (f" ({opts})" if opts else "")]
    if "syncs" in f:
        if f["syncs"]:
            lines.append(f"  {f['syncs']} syncs into {f['workers']} rollout worker(s): "
                         f"{_mib(f['bytes_per_sync']['mean'])} per sync, verified byte for byte {f['verified']} of "
                         f"{f['syncs']}, retries {f['retries']}")
            lines.append(f"  seconds per sync (the slowest worker's write): {_range(f['seconds'])}")
        else:
            lines.append(f"  {f['why']}")
    if "engine" in f:
        e = f["engine"]
        lines.append(f"  checkpoint engine (astate/*): {e['steps']} syncs, {_mib(e['bytes_per_sender']['mean'])} per "
                     f"sender" + (f", {_range(e['seconds'])} s" if e["seconds"] else ""))
    return lines + ([f"  {verl}"] if verl else [])


def render(facts: Mapping[str, Any]) -> str:
    """The summary as printed at the end of a run and by `ring-ext report`."""
    name = "/".join(x for x in (facts.get("project"), facts.get("experiment")) if x)
    head = f"===== {TITLE}" + (f": {name}" if name else "") + f", steps {facts['first_step']}-{facts['last_step']}"
    if facts.get("exit_code"):
        head += f" (the run FAILED, exit code {facts['exit_code']})"
    lines = [head + " ====="]
    if facts["reward"]:
        r = facts["reward"]
        lines.append(f"reward ({r['metric']}): {_g(r['first'])} at step {facts['first_step']} -> {_g(r['last'])} at "
                     f"step {facts['last_step']}, mean {_g(r['mean'])}")
    if facts["step_s"]:
        lines.append(f"step time (timing_s/step): {_g(facts['step_s']['sum'])} s in all, {_range(facts['step_s'])} s")
    lines += _icepop_lines(facts["icepop"]) + _c3po_lines(facts["c3po"]) + _astate_lines(facts["astate"])
    if facts.get("run_dir"):
        lines.append(f"files in {facts['run_dir']}:")
        lines += textwrap.wrap(", ".join(facts["files"]), 116, initial_indent="  ", subsequent_indent="  ",
                               break_on_hyphens=False)
    return "\n".join(lines) + "\n"


def load_run(run_dir: Path, metrics: Path | None = None) -> tuple[list[dict], dict, list[dict]]:
    """(merged steps, run switches, sync records) of a run folder; ReportError when it has no usable steps."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory (give a run's trainer.default_local_dir)")
    metrics = metrics or run_dir / METRICS
    if not metrics.is_file():
        raise ReportError(f"{metrics} does not exist: the run wrote no step records (ring-ext's run record, or "
                          f"give verl's file-logger JSONL with --metrics)")
    records = read_jsonl(metrics)
    if not records:
        raise ReportError(f"{metrics} is empty: the run logged no step")
    if not all(isinstance(r, dict) and "step" in r for r in records):
        raise ReportError(f"{metrics}: every line must be a step record {{\"step\": N, \"data\": {{...}}}}")
    run_file, syncs_file = run_dir / RUN, run_dir / SYNCS
    run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    syncs = read_jsonl(syncs_file) if syncs_file.is_file() else []
    jobs = run.get("jobs")  # this run's Ray jobs (a resumed run has several); a folder reused from scratch has others
    return merge_steps(records), run, [s for s in syncs if not jobs or s.get("job") in jobs]


def run_files(run_dir: Path, written: Sequence[str] = ()) -> list[str]:
    """What a user looks for in a run folder (and the files about to be `written`), checkpoints last, counted."""
    names = [SUMMARY_TXT, SUMMARY_JSON, "ring_ext_curves.png", "c3po_timeline.png", METRICS, TIMELINE_JSONL, SYNCS, RUN]
    out = [n for n in names if n in written or (run_dir / n).exists()]
    if (run_dir / "wandb").is_dir():
        out.append("wandb/")
    ckpts = sorted(run_dir.glob("global_step_*"), key=lambda p: int(p.name.rpartition("_")[2] or 0))
    if ckpts:
        out.append(f"{ckpts[-1].name}/" + (f" (last of {len(ckpts)} checkpoints)" if len(ckpts) > 1 else ""))
    return out

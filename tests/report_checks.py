"""`check_real_run`: what a real `main_ppo` run (e.g. `+recipe=ring1t`) must show at its end, for an end-to-end
fixture to call: the summary printed last, its files in the run folder, and its numbers equal to the run's own
logged metrics, recomputed here from verl's file-logger records (not through `ring_ext.report`)."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from ring_ext.report import METRICS, RUN, SUMMARY_JSON, SUMMARY_TXT, TIMELINE_JSONL, render

PNG = b"\x89PNG\r\n\x1a\n"
SYNC_LINE = re.compile(r"sync (\d+) into rollout worker (\d+) in place: [\d.]+ MiB in [\d.]+s \(.*?verified=(\w+), "
                       r"attempts=(\d+)\)")


def _same(x: float) -> object:
    return pytest.approx(x, rel=1e-9, abs=1e-12)


def _png(path: Path) -> None:
    assert path.is_file(), f"{path} was not drawn"
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000, f"{path} is not a drawn PNG"


def check_real_run(run_dir: Path, steps: list[dict], log: str) -> None:
    """`run_dir`: the run's trainer.default_local_dir. `steps`: verl's file-logger records of the run,
    {"step": int, "data": {metric: value}}, in the order logged (a resumed run: its first process's, then the
    next's). `log`: stdout + stderr of the process that ended the run (the driver, which prints the summary)."""
    summary = (run_dir / SUMMARY_TXT).read_text()
    facts = json.loads((run_dir / SUMMARY_JSON).read_text())
    for name in (METRICS, RUN):
        assert (run_dir / name).is_file(), f"no {name} in {run_dir}"
    _png(run_dir / "ring_ext_curves.png")
    if (run_dir / TIMELINE_JSONL).is_file():
        _png(run_dir / "c3po_timeline.png")
    assert "NOTE:" not in summary, summary  # every figure drawn
    assert summary == render(facts), "the summary's text is not its facts"
    assert log.rstrip().endswith(summary.rstrip()), f"the summary is not the log's end:\n{log[-3000:]}"

    data: dict[int, dict] = {}
    for record in steps:
        data.setdefault(int(record["step"]), {}).update(record["data"])
    trained = [data[s] for s in sorted(data) if "timing_s/step" in data[s]]
    trained_steps = [s for s in sorted(data) if "timing_s/step" in data[s]]
    assert (facts["steps"], facts["first_step"], facts["last_step"]) == (len(trained), trained_steps[0],
                                                                          trained_steps[-1])

    def col(key: str) -> list[float]:
        return [float(d[key]) for d in trained if d.get(key) is not None]

    def spread(f: dict, key: str) -> None:
        xs = col(key)
        assert (f["n"], f["mean"], f["min"], f["max"]) == (len(xs), _same(statistics.fmean(xs)), min(xs), max(xs)), key

    if col("critic/score/mean"):
        r = col("critic/score/mean")
        assert facts["reward"] == {"metric": "critic/score/mean", "first": r[0], "last": r[-1],
                                   "mean": _same(statistics.fmean(r))}

    ice = facts["icepop"]
    assert ice["on"] == bool(col("actor/mismatch/kept_frac")) or "loss" not in ice, ice
    if col("actor/mismatch/kept_frac"):
        for name in ("kept_frac", "masked_below_frac", "masked_above_frac", "k3"):
            spread(ice[name], f"actor/mismatch/{name}")
        lags = sorted({int(k.split("/")[2][3:]) for d in trained for k in d if k.startswith("actor/mismatch/lag")})
        assert sorted(int(n) for n in ice["by_lag"]) == lags
        for n in lags:
            assert ice["by_lag"][str(n)]["steps"] == len(col(f"actor/mismatch/lag{n}/kept_frac")), n
            for name in ("kept_frac", "masked_below_frac", "masked_above_frac", "k3"):
                spread(ice["by_lag"][str(n)][name], f"actor/mismatch/lag{n}/{name}")

    c3po = facts["c3po"]
    assert ("knobs" in c3po) == bool(col("c3po/budget_used")), c3po
    if col("c3po/budget_used"):
        spread(c3po["budget_used"], "c3po/budget_used")
        for name in ("tokens_trained", "trajectories_trained", "trajectories_multi_version", "groups_purged"):
            assert c3po[name] == _same(sum(col(f"c3po/{name}"))), name
        assert c3po["version_lag_max"] == max(col("c3po/version_lag/max"))
        assert c3po["steps_multi_version"] == sum(x > 0 for x in col("c3po/trajectories_multi_version"))
        if c3po["rollout_metric"]:
            spread(c3po["rollout_s"], c3po["rollout_metric"])

    astate = facts["astate"]
    if col("timing_s/update_weights"):
        spread(astate["update_weights_s"], "timing_s/update_weights")
    synced = SYNC_LINE.findall(log)
    if synced and len(json.loads((run_dir / RUN).read_text()).get("jobs", [])) == 1:  # one process: its log is all
        versions = {int(v) for v, *_ in synced}
        assert astate["on"] and astate["syncs"] == len(versions), (astate, synced)
        verified = {int(v) for v, _, ok, _ in synced if ok == "True"}
        assert astate["verified"] == len(verified - {int(v) for v, _, ok, _ in synced if ok != "True"})
        assert astate["retries"] == sum(int(a) - 1 for *_, a in synced)

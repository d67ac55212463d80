"""The run summary (`ring_ext.report`), its figures, `ring-ext report`, and the record a verl run leaves for them
(`ring_ext.run_record`, through verl's real `Tracking`). A real `+recipe=ring1t` run is checked by
`report_checks.check_real_run`, called from an end-to-end fixture."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ring_ext import report as rep
from ring_ext import report_figures
from ring_ext.cli import main as cli

PNG = b"\x89PNG\r\n\x1a\n"
RUN = {"project": "ring_ext", "experiment": "t", "jobs": ["01000000"], "loss_mode": "icepop", "mismatch_loss": True,
       "policy_loss": {"loss_mode": "icepop", "icepop_alpha": 0.5, "icepop_beta": 5.0, "clip_ratio": 0.2},
       "trainer_mode": "c3po", "c3po": {"token_budget": 256, "pool_prompts": 24, "max_retention": 1},
       "checkpoint_engine": "naive", "weight_transfer": "astate", "astate": None}


def _step(step: int, **metrics: float) -> dict:
    return {"step": step, "data": {"timing_s/step": 10.0 + step, "actor/pg_loss": 0.1, **metrics}}


def _mismatch(kept: float, below: float, above: float, k3: float, lag: dict[int, tuple[float, ...]]) -> dict:
    out = {"actor/mismatch/kept_frac": kept, "actor/mismatch/masked_below_frac": below,
           "actor/mismatch/masked_above_frac": above, "actor/mismatch/k3": k3, "actor/mismatch/k1": k3 / 2}
    for n, (lk, lb, la, l3) in lag.items():
        out |= {f"actor/mismatch/lag{n}/kept_frac": lk, f"actor/mismatch/lag{n}/masked_below_frac": lb,
                f"actor/mismatch/lag{n}/masked_above_frac": la, f"actor/mismatch/lag{n}/k3": l3,
                f"actor/mismatch/lag{n}/k1": l3 / 2}
    return out


def _c3po(budget: float, multi: int, trained: int, purged: int, lag_max: int, wait: float) -> dict:
    return {"c3po/budget_used": budget, "c3po/tokens_trained": round(budget * 256),
            "c3po/trajectories_trained": trained,
            "c3po/trajectories_multi_version": multi, "c3po/groups_purged": purged, "c3po/version_lag/max": lag_max,
            "c3po/stale_token_fraction": 0.1 * lag_max, "c3po/trainer_wait_s": wait}


STEPS = [
    {"step": 0, "data": {"val-core/acc": 0.1}},  # val_before_train: not a training step
    _step(1, **{"critic/score/mean": 0.25, "timing_s/update_weights": 0.5},
          **_mismatch(1.0, 0.0, 0.0, 1e-4, {0: (1.0, 0.0, 0.0, 1e-4)}), **_c3po(1.02, 0, 12, 0, 0, 3.0)),
    _step(2, **{"critic/score/mean": 0.5, "timing_s/update_weights": 0.7},
          **_mismatch(0.99, 0.006, 0.004, 2e-3, {0: (1.0, 0.0, 0.0, 2e-4), 1: (0.98, 0.012, 0.008, 5e-3)}),
          **_c3po(1.08, 3, 14, 1, 1, 4.0)),
    _step(3, **{"critic/score/mean": 0.75, "timing_s/update_weights": 0.6},
          **_mismatch(0.995, 0.003, 0.002, 1e-3, {1: (0.99, 0.006, 0.004, 3e-3)}), **_c3po(1.05, 2, 10, 0, 1, 5.0)),
]
SYNCS = [  # two rollout workers, versions 1-4 (the initial sync and one per step); one retry at version 3
    {"job": "01000000", "replica": 0, "rank": r, "version": v, "global_steps": v - 1, "bytes": 100_000 + r,
     "seconds": 0.01 * v + r, "verified": v == 1, "attempts": 2 if (v, r) == (3, 1) else 1}
    for v in range(1, 5) for r in range(2)
] + [{"job": "0f000000", "replica": 0, "rank": 0, "version": 1, "global_steps": 0, "bytes": 1, "seconds": 9.0,
      "verified": True, "attempts": 1}]  # another run's, in the same folder: not this run's


def _write_run(run_dir: Path, steps: list[dict] = STEPS, run: dict | None = RUN, syncs: list[dict] = SYNCS,
               timeline: bool = True) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / rep.METRICS).write_text("".join(json.dumps(s) + "\n" for s in steps))
    if run is not None:
        (run_dir / rep.RUN).write_text(json.dumps(run))
    (run_dir / rep.SYNCS).write_text("".join(json.dumps(s) + "\n" for s in syncs))
    if timeline:
        rows = [{"step": 2, "key": "a_0_0", "purged": False, "dispatch_step": 1, "segments": [[0, 5, 1.0, 2.0],
                                                                                             [1, 7, 3.0, 4.0]]},
                {"step": 2, "key": "b_0_0", "purged": True, "dispatch_step": 1, "segments": [[1, 3, 3.0, 3.5]]}]
        (run_dir / rep.TIMELINE_JSONL).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def _facts(run_dir: Path) -> dict:
    steps, run, syncs = rep.load_run(run_dir)
    return rep.summarise(steps, run, syncs)


def test_summary_numbers_are_the_logged_metrics(tmp_path: Path) -> None:
    f = _facts(_write_run(tmp_path))
    assert (f["steps"], f["first_step"], f["last_step"]) == (3, 1, 3)  # step 0 only validated
    assert f["reward"] == {"metric": "critic/score/mean", "first": 0.25, "last": 0.75, "mean": pytest.approx(0.5)}
    ice = f["icepop"]
    assert ice["on"] and ice["loss"] == "icepop(alpha=0.5, beta=5.0)"
    assert ice["kept_frac"]["mean"] == pytest.approx((1.0 + 0.99 + 0.995) / 3) and ice["kept_frac"]["min"] == 0.99
    assert ice["masked_below_frac"]["mean"] == pytest.approx(0.003) and ice["masked_above_frac"]["max"] == 0.004
    assert ice["k3"]["max"] == 2e-3 and ice["steps_masking"] == 2
    c = f["c3po"]
    assert c["knobs"] == "token_budget(Phi)=256 pool_prompts(Omega)=24 max_retention(sigma)=1"
    assert c["budget_used"]["mean"] == pytest.approx(1.05) and (c["budget_used"]["min"], c["budget_used"]["max"]) \
        == (1.02, 1.08)
    assert (c["trajectories_multi_version"], c["trajectories_trained"], c["steps_multi_version"]) == (5, 36, 2)
    assert (c["groups_purged"], c["version_lag_max"]) == (1, 1)
    assert c["tokens_trained"] == 261 + 276 + 269
    assert c["rollout_metric"] == "c3po/trainer_wait_s" and c["rollout_s"]["sum"] == 12.0
    a = f["astate"]
    assert a["on"] and a["how"] == "in place into the rollout workers' parameters"
    assert (a["syncs"], a["workers"], a["verified"], a["retries"]) == (4, 2, 1, 1)  # the other job's sync left out
    assert a["bytes_per_sync"]["mean"] == 200_001 and a["seconds"]["max"] == pytest.approx(1.04)
    assert a["update_weights_s"]["mean"] == pytest.approx(0.6)
    text = rep.render(f)
    for line in ("reward (critic/score/mean): 0.25 at step 1 -> 0.75 at step 3, mean 0.5",
                 "IcePop: on, icepop(alpha=0.5, beta=5.0)",
                 "tokens kept 99.5% (min 99%), masked below 0.3%, masked above 0.2%; steps with masked tokens: 2 of 3",
                 "budget used (c3po/budget_used) mean 1.05 (min 1.02, max 1.08) over 3 steps",
                 "trajectories spanning policy versions: 5 of 36 trained (in 2 of 3 steps); groups purged: 1\n",
                 "version lag: max 1, stale tokens 6.667% (mean of c3po/stale_token_fraction)\n",
                 "rollout (c3po/trainer_wait_s): 12 s in all",
                 "4 syncs into 2 rollout worker(s): 0.1907 MiB per sync, verified byte for byte 1 of 4, retries 1",
                 "seconds per sync (the slowest worker's write): mean 1.025 (min 1.01, max 1.04)",
                 "verl's timing_s/update_weights mean 0.6 (min 0.5, max 0.7) s over 3 steps"):
        assert line in text, (line, text)


def test_per_lag_counts_and_means(tmp_path: Path) -> None:
    f = _facts(_write_run(tmp_path))
    by_lag = f["icepop"]["by_lag"]
    assert sorted(by_lag) == ["0", "1"]
    assert (by_lag["0"]["steps"], by_lag["1"]["steps"]) == (2, 2)  # lag 0 in steps 1-2, lag 1 in steps 2-3
    assert by_lag["0"]["k3"]["mean"] == pytest.approx(1.5e-4) and by_lag["1"]["k3"]["mean"] == pytest.approx(4e-3)
    assert by_lag["1"]["kept_frac"]["mean"] == pytest.approx(0.985)
    assert by_lag["1"]["masked_below_frac"]["mean"] == pytest.approx(0.009)
    text = rep.render(f)
    assert "version lag 0: 2 steps, kept 100%, below 0%, above 0%, k3 0.00015" in text
    assert "version lag 1: 2 steps, kept 98.5%, below 0.9%, above 0.6%, k3 0.004" in text


def test_per_lag_bands_and_whole_response_rejections_are_shown_when_logged(tmp_path: Path) -> None:
    steps = [dict(s, data={**s["data"], "actor/mismatch/seq_rejected_frac": 0.25 * s["step"],
                           "actor/mismatch/lag1/band_lo": 0.4, "actor/mismatch/lag1/band_hi": 3.0})
             for s in STEPS[1:]]
    f = _facts(_write_run(tmp_path, steps))
    assert f["icepop"]["by_lag"]["1"]["band"] == [0.4, 3.0] and f["icepop"]["by_lag"]["0"]["band"] is None
    text = rep.render(f)
    assert "version lag 1: 2 steps in band [0.4, 3], kept 98.5%" in text
    assert "responses rejected whole (seq_rejected_frac) mean 50% (min 25%, max 75%)" in text


def test_a_run_without_the_techniques_says_each_is_off(tmp_path: Path) -> None:
    grpo = [_step(s, **{"critic/score/mean": 0.5, "timing_s/gen": 2.0, "timing_s/update_weights": 0.3})
            for s in (1, 2)]
    run = {**RUN, "loss_mode": "vanilla", "mismatch_loss": False, "policy_loss": {}, "trainer_mode": "sync",
           "c3po": None, "weight_transfer": None}
    text = rep.render(_facts(_write_run(tmp_path / "grpo", grpo, run, [], timeline=False)))
    assert "IcePop: off: policy loss vanilla (actor_rollout_ref.actor.policy_loss.loss_mode)" in text
    assert "C3PO++: off: trainer.v1.trainer_mode=sync" in text
    assert "AState: off: weights copied by verl's naive sync" in text
    assert "verl's timing_s/update_weights mean 0.3" in text  # the sync still timed
    # no switches recorded (e.g. only verl's file-logger JSONL): decided from what was logged
    text = rep.render(_facts(_write_run(tmp_path / "bare", grpo, None, [], timeline=False)))
    assert "IcePop: off: no actor/mismatch/* metric was logged" in text
    assert "C3PO++: off: no c3po/* metric was logged" in text and "AState: off" in text
    # switched on, but nothing logged: said, not hidden
    text = rep.render(_facts(_write_run(tmp_path / "silent", grpo, {**RUN, "trainer_mode": "c3po"}, [], False)))
    assert "C3PO++: on, trainer mode c3po, but no c3po/* metric was logged" in text
    assert "IcePop: on, policy loss icepop, but no actor/mismatch/* metric was logged" in text


def test_a_resumed_or_restarted_run_counts_each_step_once() -> None:
    records = [_step(1, x=1.0), _step(2, x=2.0), _step(3, x=3.0),  # crashed after logging step 3
               {"step": 2, "data": {"val-core/acc": 0.5}}, _step(3, x=30.0), _step(4, x=4.0)]  # resumed at step 2
    merged = rep.merge_steps(records)
    assert [s["step"] for s in merged] == [1, 2, 3, 4]
    assert [s["data"]["x"] for s in merged] == [1.0, 2.0, 30.0, 4.0] and merged[1]["data"]["val-core/acc"] == 0.5


def test_cli_prints_the_summary_and_draws_both_figures(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = _write_run(tmp_path / "run")
    (run_dir / "wandb").mkdir()
    assert cli(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"===== {rep.TITLE}: ring_ext/t, steps 1-3 =====")
    assert out == (run_dir / rep.SUMMARY_TXT).read_text()
    assert json.loads((run_dir / rep.SUMMARY_JSON).read_text())["c3po"]["groups_purged"] == 1
    for png in ("ring_ext_curves.png", "c3po_timeline.png"):
        assert (run_dir / png).read_bytes()[:8] == PNG and (run_dir / png).stat().st_size > 10_000, png
    assert f"files in {run_dir}:" in out and "ring_ext_curves.png, c3po_timeline.png" in out and "wandb/" in out
    # --out elsewhere leaves the run folder as it was; --metrics reads verl's file-logger JSONL instead
    verl_jsonl = tmp_path / "verl.jsonl"
    verl_jsonl.write_text("".join(json.dumps(s) + "\n" for s in STEPS[:2]))
    assert cli(["report", str(run_dir), "--out", str(tmp_path / "o"), "--metrics", str(verl_jsonl)]) == 0
    assert "steps 1-1" in capsys.readouterr().out and (tmp_path / "o" / "ring_ext_curves.png").is_file()


def test_a_figure_that_cannot_be_drawn_is_said(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = _write_run(tmp_path)
    (run_dir / rep.TIMELINE_JSONL).write_text("")  # the c3po plotter refuses an empty timeline
    assert cli(["report", str(run_dir)]) == 1
    assert "NOTE: c3po_timeline.png not drawn: ValueError:" in capsys.readouterr().out
    assert (run_dir / "ring_ext_curves.png").is_file()


@pytest.mark.parametrize("case, message", [
    ("missing dir", "is not a directory"),
    ("no metrics file", "ring_ext_metrics.jsonl does not exist"),
    ("empty metrics file", "ring_ext_metrics.jsonl is empty"),
    ("validation only", "no training step"),
    ("not JSON", "ring_ext_metrics.jsonl:2 is not a JSON line"),
    ("not a step record", "every line must be a step record"),
])
def test_bad_input_is_a_clear_error_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture, case: str,
                                                     message: str) -> None:
    run_dir = tmp_path / "run"
    if case != "missing dir":
        run_dir.mkdir()
    lines = {"empty metrics file": "\n", "validation only": json.dumps(STEPS[0]) + "\n",
             "not JSON": json.dumps(STEPS[1]) + "\n{oops\n", "not a step record": "[1, 2]\n"}
    if case in lines:
        (run_dir / rep.METRICS).write_text(lines[case])
    assert cli(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ring-ext report: ") and message in err, err


def test_report_help_answers() -> None:
    from subprocess_helpers import ring_ext

    proc = ring_ext("report", "--help")
    assert proc.returncode == 0 and "RUN_DIR" in proc.stdout and "--metrics" in proc.stdout


# ---- the record a verl run leaves, through verl's own Tracking (ring_ext.verl_entry installs the wrappers) ----

def _config(run_dir: Path) -> dict:
    return {"trainer": {"default_local_dir": str(run_dir), "resume_mode": "auto", "v1": {"trainer_mode": "c3po",
                                                                                        "c3po": RUN["c3po"]}},
            "actor_rollout_ref": {"actor": {"policy_loss": RUN["policy_loss"]},
                                  "rollout": {"checkpoint_engine": {"backend": "naive"},
                                              "engine_kwargs": {"vllm": {"weight_transfer_config":
                                                                         {"backend": "astate"}}}}}}


@pytest.fixture
def no_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    from ring_ext import run_record

    monkeypatch.delenv(run_record.DRIVER_ENV, raising=False)
    monkeypatch.delenv(run_record.RUN_DIR_ENV, raising=False)


def test_verl_tracking_records_each_step_and_prints_the_summary_at_finish(
        tmp_path: Path, capsys: pytest.CaptureFixture, no_driver: None) -> None:
    from verl.utils.tracking import Tracking

    run_dir = tmp_path / "ckpt"
    tracking = Tracking("ring_ext", "t", ["console"], config=_config(run_dir))
    for s in STEPS[1:]:
        tracking.log(data=dict(s["data"]), step=s["step"])
    tracking.log(data={"val/x": float("nan")}, step=3)  # verl's file logger writes NaN as null; so does the record
    capsys.readouterr()
    tracking.finish()
    tracking.finish()  # verl calls it again from __del__: one summary
    out = capsys.readouterr().out
    assert out.count(rep.TITLE) == 1 and out == (run_dir / rep.SUMMARY_TXT).read_text()
    recorded = rep.read_jsonl(run_dir / rep.METRICS)
    assert recorded[:3] == STEPS[1:] and recorded[3] == {"step": 3, "data": {"val/x": None}}
    assert "AState: on" in out and "no per-sync record" in out  # switched on in the config, no worker wrote one
    assert json.loads((run_dir / rep.RUN).read_text())["exit_code"] == 0
    assert (run_dir / "ring_ext_curves.png").is_file() and (run_dir / "ring_ext_summary.json").is_file()


def test_an_omegaconf_config_is_recorded_as_plain_values(tmp_path: Path, no_driver: None) -> None:
    from omegaconf import OmegaConf
    from verl.utils.tracking import Tracking

    Tracking("ring_ext", "t", ["console"], config=OmegaConf.create(_config(tmp_path)))
    run = json.loads((tmp_path / rep.RUN).read_text())
    assert run["c3po"] == RUN["c3po"] and run["weight_transfer"] == "astate" and run["mismatch_loss"] is True


def test_a_resumed_run_keeps_the_steps_up_to_its_checkpoint(tmp_path: Path, no_driver: None) -> None:
    from verl.utils.tracking import Tracking

    run_dir = _write_run(tmp_path / "ckpt")  # steps 0-3 recorded
    (run_dir / "global_step_2").mkdir()
    (run_dir / "latest_checkpointed_iteration.txt").write_text("2")
    Tracking("ring_ext", "t", ["console"], config=_config(run_dir))
    assert [r["step"] for r in rep.read_jsonl(run_dir / rep.METRICS)] == [0, 1, 2]
    (run_dir / "latest_checkpointed_iteration.txt").unlink()  # a fresh run in a used folder starts over
    Tracking("ring_ext", "t", ["console"], config=_config(run_dir))
    assert (run_dir / rep.METRICS).read_text() == ""


def test_a_failing_figure_never_fails_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_driver: None,
                                              caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    from verl.utils.tracking import Tracking

    from ring_ext import report_figures

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no display")

    monkeypatch.setattr(report_figures, "draw_curves", broken)
    tracking = Tracking("ring_ext", "t", ["console"], config=_config(tmp_path))
    tracking.log(data=STEPS[1]["data"], step=1)
    with caplog.at_level(logging.WARNING, logger="ring_ext"):
        tracking.finish()
    assert "ring_ext_curves.png not drawn: RuntimeError: no display" in caplog.text
    assert "NOTE: ring_ext_curves.png not drawn" in capsys.readouterr().out
    monkeypatch.setattr(rep, "summarise", broken)  # even the summary failing leaves the run alone
    tracking = Tracking("ring_ext", "t", ["console"], config=_config(tmp_path / "b"))
    tracking.log(data=STEPS[1]["data"], step=1)
    with caplog.at_level(logging.WARNING, logger="ring_ext"):
        tracking.finish()
    assert "ring-ext: the run summary failed (RuntimeError: no display); the run goes on" in caplog.text


def test_each_in_place_sync_is_recorded_in_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import inspect

    from ring_ext.run_record import RUN_DIR_ENV, record_sync
    from ring_ext_astate import adapter as astate_adapter

    metrics = {"astate/bytes_per_worker": 4096, "astate/seconds": 0.25, "astate/version": 3,
               "astate/gb_per_s": 1.0, "astate/verified": 0.0, "astate/attempts": 2}

    class Adapter:
        replica_rank, rollout_rank = 0, 1

    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path))
    record_sync(Adapter(), metrics, 2)
    # ring-ext-astate's in-place sync calls it after every sync
    assert "record_sync(adapter, metrics, global_steps)" in inspect.getsource(astate_adapter.update_weights_in_place)
    [line] = rep.read_jsonl(tmp_path / rep.SYNCS)
    assert {k: line[k] for k in ("rank", "version", "global_steps", "bytes", "seconds", "verified", "attempts")} \
        == {"rank": 1, "version": 3, "global_steps": 2, "bytes": 4096, "seconds": 0.25, "verified": False,
            "attempts": 2}


def test_the_driver_prints_the_summary_last_only_for_its_own_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    import time

    from ring_ext import run_record

    run_dir = _write_run(tmp_path)
    monkeypatch.setattr(run_record, "_exit_report", {"run_dir": run_dir, "since": time.time() - 5})
    report_figures.write_report(run_dir)
    run_record._print_summary_at_exit()
    assert capsys.readouterr().out == "\n" + (run_dir / rep.SUMMARY_TXT).read_text()
    monkeypatch.setattr(run_record, "_exit_report", {"run_dir": run_dir, "since": time.time() + 5})
    run_record._print_summary_at_exit()  # an older run's summary in the same folder: not this driver's
    assert capsys.readouterr().out == ""


def test_the_syncs_of_a_resumed_run_s_two_processes_stay_apart(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    """Each process's vLLM engine counts versions from 1 again and Ray gives both the same job id ("01000000"):
    the driver's own run id keeps the two processes' syncs apart (1 worker, 4 + 3 syncs, not 2 workers and 4)."""
    from ring_ext import run_record

    class Adapter:
        replica_rank, rollout_rank = 0, 0

    metrics = {"astate/bytes_per_worker": 100, "astate/seconds": 0.1, "astate/verified": 0.0, "astate/attempts": 1}
    monkeypatch.setenv(run_record.RUN_DIR_ENV, str(tmp_path))
    for run_id, versions in (("first", range(1, 5)), ("second", range(1, 4))):
        monkeypatch.setenv(run_record.RUN_ID_ENV, run_id)
        for v in versions:
            run_record.record_sync(Adapter(), {**metrics, "astate/version": v}, v - 1)
    facts = rep._sync_facts(rep.read_jsonl(tmp_path / rep.SYNCS))
    assert (facts["syncs"], facts["workers"]) == (7, 1)
    assert facts["bytes_per_sync"]["mean"] == 100

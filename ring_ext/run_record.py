"""A verl PPO run's own record in `trainer.default_local_dir`, and its summary printed as the log's last word.

Where it sits: the thin verl side of `ring_ext.report` (which holds the summary and knows no verl). verl imports
ring-ext's entry point in every process; `ring_ext.verl_entry` installs these wrappers:
- `Tracking.__init__`, `Tracking.log` (the TaskRunner's logger): the run's switches to ring_ext_run.json, and every
  step's metrics, as verl's `file` logger writes them, to ring_ext_metrics.jsonl (verl's file logger is not always
  on). A resumed run keeps the steps up to its checkpoint; a fresh one in a used folder starts the file over.
- `Tracking.finish`: ring_ext_summary.txt/.json and the figures (a figure that fails is a NOTE, never an error);
- `record_sync`, called by ring-ext-astate after each in-place sync (in the trainer ranks): one line per sync to
  ring_ext_syncs.jsonl, since verl's colocated trainers drop a sync's metrics;
- in the driver, a start-up check: every process learns the run folder (RING_EXT_RUN_DIR, before Ray starts), and
  the driver prints the summary when it exits, after Ray has stopped, so nothing of the run's log comes after it.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ring_ext.report import METRICS, RUN, SUMMARY_JSON, SUMMARY_TXT, SYNCS
from ring_ext.report_figures import write_report

logger = logging.getLogger("ring_ext")
RUN_DIR_ENV = "RING_EXT_RUN_DIR"  # the run folder, absolute, as the driver sees it
DRIVER_ENV = "RING_EXT_REPORT_DRIVER"  # pid of the driver that prints the summary at exit
RUN_ID_ENV = "RING_EXT_RUN_ID"  # drawn by the driver: which process of a (resumed) run a record comes from
_exit_report: dict[str, Any] = {}  # the driver's run folder and start time, for the atexit print


def _get(tree: Any, path: str, default: Any = None) -> Any:
    for key in path.split("."):
        if not isinstance(tree, Mapping) or key not in tree:
            return default
        tree = tree[key]
    return tree


def _plain(value: Any) -> float | int | None:
    """A metric as verl's file logger writes it: a number, or null for NaN and infinities."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        x = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _job() -> str | None:
    """This process's run: the id the driver drew (every process of a local Ray cluster inherits it), else Ray's job
    id. Ray's ids repeat across clusters ("01000000" for each fresh one), so a resumed run's two processes, or a
    fresh run in a reused folder, would share one."""
    if os.environ.get(RUN_ID_ENV):
        return os.environ[RUN_ID_ENV]
    try:
        import ray

        return ray.get_runtime_context().get_job_id() if ray.is_initialized() else None
    except Exception:
        return None


def _is_mismatch_loss(mode: str) -> bool:
    """Whether `mode` is one of ring-ext-icepop's losses (ring_ext.known_plugins, the core's one table of them)."""
    from ring_ext.known_plugins import provider

    plugin = provider("policy_loss", mode)
    return plugin is not None and plugin.distribution == "ring-ext-icepop"


def resumed_step(trainer: Mapping[str, Any], run_dir: Path) -> int:
    """The step verl's trainer resumes from (0: from scratch), decided as `_load_checkpoint` does."""
    mode = trainer.get("resume_mode", "auto")
    if mode == "resume_path":
        return int(str(trainer.get("resume_from_path")).split("global_step_")[-1])
    tracker = run_dir / "latest_checkpointed_iteration.txt"
    if mode != "auto" or not tracker.is_file():
        return 0
    step = int(tracker.read_text().strip() or 0)
    return step if (run_dir / f"global_step_{step}").is_dir() else 0


class RunRecord:
    """The record of one Tracking (one trainer process); `start` writes the switches and keeps the resumed steps."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    @classmethod
    def start(cls, config: Mapping[str, Any], project: str, experiment: str) -> RunRecord:
        trainer = config["trainer"]
        record = cls(Path(str(trainer["default_local_dir"])))
        record.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = resumed_step(trainer, record.run_dir)
        old = record.read_run()
        metrics = record.run_dir / METRICS
        if metrics.is_file():  # steps after the checkpoint are logged again; a fresh start drops them all
            kept = [line for line in metrics.read_text().splitlines()
                    if line.strip() and resumed and json.loads(line)["step"] <= resumed]
            metrics.write_text("".join(f"{line}\n" for line in kept))
        actor, rollout = _get(config, "actor_rollout_ref.actor", {}), _get(config, "actor_rollout_ref.rollout", {})
        policy_loss = dict(_get(actor, "policy_loss", {}) or {})
        record.write_run({
            "project": project, "experiment": experiment, "resumed_from": resumed,
            "jobs": [*(old.get("jobs", []) if resumed else []), _job()],
            "loss_mode": policy_loss.get("loss_mode", "vanilla"),
            "mismatch_loss": _is_mismatch_loss(policy_loss.get("loss_mode", "vanilla")),
            "policy_loss": {k: v for k, v in policy_loss.items() if not k.startswith("_")},
            "trainer_mode": _get(trainer, "v1.trainer_mode", "sync"), "c3po": _get(trainer, "v1.c3po"),
            "checkpoint_engine": _get(rollout, "checkpoint_engine.backend"),
            "weight_transfer": _get(rollout, "engine_kwargs.vllm.weight_transfer_config.backend"),
            "astate": _get(rollout, "checkpoint_engine.engine_kwargs.astate"),
        })
        return record

    def read_run(self) -> dict:
        path = self.run_dir / RUN
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_run(self, run: Mapping[str, Any]) -> None:
        (self.run_dir / RUN).write_text(json.dumps(run, indent=1, default=str) + "\n")

    def log(self, data: Mapping[str, Any], step: int) -> None:
        line = json.dumps({"step": int(step), "data": {k: _plain(v) for k, v in data.items()}}, allow_nan=False)
        with open(self.run_dir / METRICS, "a") as f:
            f.write(line + "\n")

    def finish(self, exit_code: int) -> None:
        self.write_run({**self.read_run(), "exit_code": exit_code})
        report = write_report(self.run_dir)
        for problem in report.problems:
            logger.warning("ring-ext: %s", problem)
        driver = os.environ.get(DRIVER_ENV)
        if driver and driver != str(os.getpid()) and os.environ.get(RUN_DIR_ENV) == str(self.run_dir.absolute()):
            logger.warning("ring-ext: run summary in %s (printed when the driver exits)", self.run_dir / SUMMARY_TXT)
        elif not driver or driver != str(os.getpid()):
            print(report.text, end="", flush=True)


def _quietly(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:  # the record must never fail the run it records
        logger.warning("ring-ext: %s failed (%s: %s); the run goes on", what, type(exc).__name__, exc)
        return None


def record_on_init(init: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps `verl.utils.tracking.Tracking.__init__`: a PPO run (its config has actor_rollout_ref) gets a record."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def tracking_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        given = signature.bind(self, *args, **kwargs).arguments
        config = given.get("config")
        if config is not None and not isinstance(config, dict) and hasattr(config, "_metadata"):  # an OmegaConf node
            from omegaconf import OmegaConf

            config = OmegaConf.to_container(config, resolve=True)
        if isinstance(config, Mapping) and "actor_rollout_ref" in config:
            self._ring_ext_record = _quietly("the run record", RunRecord.start, config,
                                             given.get("project_name"), given.get("experiment_name"))

    return tracking_init


def record_on_log(log: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps `Tracking.log`: each call that goes to every backend is a line of ring_ext_metrics.jsonl."""

    @functools.wraps(log)
    def tracking_log(self: Any, data: Any, step: Any, backend: Any = None) -> Any:
        result = log(self, data=data, step=step, backend=backend)
        record = getattr(self, "_ring_ext_record", None)
        if record is not None and backend is None:
            _quietly("recording a step", record.log, data, step)
        return result

    return tracking_log


def report_on_finish(finish: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps `Tracking.finish` (verl calls it once, then again from `__del__`): the summary and figures, once."""

    @functools.wraps(finish)
    def tracking_finish(self: Any, exit_code: int = 0) -> Any:
        first = not getattr(self, "_finished", False)
        result = finish(self, exit_code=exit_code)
        record = getattr(self, "_ring_ext_record", None)
        if first and record is not None:
            _quietly("the run summary", record.finish, exit_code)
        return result

    return tracking_finish


def record_sync(adapter: Any, metrics: Mapping[str, Any], global_steps: int | None) -> None:
    """Called by ring-ext-astate's `update_weights_in_place` (a trainer rank's in-place sync into its rollout worker)
    after each sync: its metrics, one line per sync and worker, to ring_ext_syncs.jsonl in the run folder."""
    run_dir = os.environ.get(RUN_DIR_ENV)
    if run_dir:
        _quietly("recording a weight sync", _append_sync, Path(run_dir), adapter, metrics, global_steps)


def _append_sync(run_dir: Path, adapter: Any, metrics: Mapping[str, Any], global_steps: int | None) -> None:
    line = {"job": _job(), "replica": getattr(adapter, "replica_rank", 0), "rank": getattr(adapter, "rollout_rank", 0),
            "version": int(metrics["astate/version"]), "global_steps": global_steps,
            "bytes": int(metrics["astate/bytes_per_worker"]), "seconds": float(metrics["astate/seconds"]),
            "verified": bool(metrics["astate/verified"]), "attempts": int(metrics["astate/attempts"]),
            "time": time.time()}
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / SYNCS, "a") as f:  # one short write per line: appends of several workers do not interleave
        f.write(json.dumps(line) + "\n")


def name_the_run_dir(config: Any) -> None:
    """Start-up check (the driver, before Ray): every process of the run learns its folder, and the driver prints
    the run's summary when it exits."""
    run_dir = Path(str(config.trainer.default_local_dir)).absolute()
    os.environ[RUN_DIR_ENV] = str(run_dir)
    os.environ[DRIVER_ENV] = str(os.getpid())
    os.environ[RUN_ID_ENV] = uuid.uuid4().hex[:16]
    if not _exit_report:
        atexit.register(_print_summary_at_exit)
    _exit_report.update(run_dir=run_dir, since=time.time())


def _stop_ray() -> None:
    """What Ray's own atexit hook does next (it was registered at `import ray`, before ours, so it runs after): its
    shutdown prints the worker log lines it held back as repeats, which would otherwise follow the summary."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown(_exiting_interpreter=True)


def _print_summary_at_exit() -> None:
    """The summary the run's trainer wrote, if it wrote one after this driver started; one line for a failed run."""
    run_dir, since = _exit_report["run_dir"], _exit_report["since"]
    text, facts = run_dir / SUMMARY_TXT, run_dir / SUMMARY_JSON
    try:
        if not text.is_file() or text.stat().st_mtime < since:
            return
        _stop_ray()
        if json.loads(facts.read_text()).get("exit_code"):
            print(f"ring-ext: summary of the failed run in {text}", flush=True)
        else:
            print("\n" + text.read_text(), end="", flush=True)
    except Exception as exc:
        print(f"ring-ext: the run summary in {text} could not be read: {exc}", flush=True)

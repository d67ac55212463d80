"""Run one of verl's unchanged entry points in a subprocess and read back its per-step metrics.

The end-to-end tests, the vLLM benchmarks and `ring-ext pipeline` drive training this way: verl's file
logger (`trainer.logger=[console,file]`, path from VERL_FILE_LOGGER_PATH) writes one JSON line per step,
unbuffered, so a caller can follow progress while the run goes on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

MAIN_PPO = ("-m", "verl.trainer.main_ppo")
POLL_S = 1.0


class VerlRunError(RuntimeError):
    pass


@dataclass(frozen=True)
class VerlRun:
    steps: list[dict]  # verl's file-logger records: {"step": int, "data": {metric: value}}
    log: str  # stdout + stderr, also written to <workdir>/<name>.log


def sft_command(nproc: int = 1) -> tuple[str, ...]:
    """verl's SFT trainer under torchrun (it reads RANK/WORLD_SIZE from the environment)."""
    return ("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "verl.trainer.sft_trainer")


class _RecordTail:
    """The file logger's records, read incrementally: each poll parses only the bytes appended since the last."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.records = path, 0, []

    def poll(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next poll
        new = [json.loads(line) for line in chunk[:end].splitlines() if line.strip()]
        self.offset += end
        self.records += new
        return new


def run_verl(command: Sequence[str], overrides: Sequence[str], workdir: Path, *, name: str,
             env: Mapping[str, str] | None = None, timeout: float = 1200,
             on_step: Callable[[dict], None] | None = None, loggers: Sequence[str] = ("console",)) -> VerlRun:
    """`python <command> <overrides> trainer.logger=[<loggers>,file]` from `workdir`.

    `on_step` gets each file-logger record as it appears. Raises VerlRunError with the log tail when the
    process fails or outlives `timeout` (it is killed then).
    """
    metrics, log_path = workdir / f"{name}.jsonl", workdir / f"{name}.log"
    metrics.unlink(missing_ok=True)  # a rerun must not read the previous attempt's steps
    cmd = [sys.executable, *command, *overrides, f"trainer.logger=[{','.join([*loggers, 'file'])}]"]
    tail, deadline = _RecordTail(metrics), time.monotonic() + timeout

    def report() -> None:
        for record in tail.poll():
            if on_step is not None:
                on_step(record)

    with log_path.open("w") as log_file:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=log_file, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {}), "VERL_FILE_LOGGER_PATH": str(metrics)})
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise VerlRunError(f"{name}: no exit after {timeout:.0f} s, killed; log in {log_path}:\n"
                                   f"{log_path.read_text()[-5000:]}")
            time.sleep(POLL_S)
            report()
    report()
    log = log_path.read_text()
    if proc.returncode != 0:
        raise VerlRunError(f"{name}: exited {proc.returncode}, log in {log_path}:\n{log[-5000:]}")
    return VerlRun(tail.records, log)


def run_main_ppo(overrides: Sequence[str], workdir: Path, *, name: str = "main_ppo",
                 env: Mapping[str, str] | None = None, timeout: float = 1200,
                 loggers: Sequence[str] = ("console",)) -> VerlRun:
    """Train with `overrides` (e.g. "+recipe=ring1t") through `python -m verl.trainer.main_ppo`."""
    return run_verl(MAIN_PPO, overrides, workdir, name=name, env=env, timeout=timeout, loggers=loggers)

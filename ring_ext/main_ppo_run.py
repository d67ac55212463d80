"""Run verl's unchanged `python -m verl.trainer.main_ppo` in a subprocess and read back its per-step metrics.

The end-to-end tests and the vLLM benchmarks drive training this way: verl's file logger
(`trainer.logger=[console,file]`, path from VERL_FILE_LOGGER_PATH) writes one JSON line per step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


class MainPPOError(RuntimeError):
    pass


@dataclass(frozen=True)
class MainPPORun:
    steps: list[dict]  # verl's file-logger records: {"step": int, "data": {metric: value}}
    log: str  # stdout + stderr, also written to <workdir>/<name>.log


def run_main_ppo(overrides: Sequence[str], workdir: Path, *, name: str = "main_ppo",
                 env: Mapping[str, str] | None = None, timeout: float = 1200) -> MainPPORun:
    """Train with `overrides` (e.g. "+recipe=ring1t") from `workdir`; raise MainPPOError with the log tail on failure."""
    metrics = workdir / f"{name}.jsonl"
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", *overrides, "trainer.logger=[console,file]"]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {}), "VERL_FILE_LOGGER_PATH": str(metrics)})
    log = proc.stdout + proc.stderr
    (workdir / f"{name}.log").write_text(log)
    if proc.returncode != 0:
        raise MainPPOError(f"main_ppo exited {proc.returncode}, log in {workdir / f'{name}.log'}:\n"
                           f"{proc.stderr[-5000:]}")
    return MainPPORun([json.loads(line) for line in metrics.read_text().splitlines()], log)

"""Run code in a fresh interpreter (fresh plugin state) and read its last JSON line; run the `ring-ext` command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path


def run_python(code: str, *, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Run `code` in a new interpreter (fresh plugin state) and return its stdout; fail with stderr."""
    import os

    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


def last_json(stdout: str) -> object:
    return json.loads(stdout.strip().splitlines()[-1])


def ring_ext(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The installed `ring-ext` console script with `args` (its exit code is the caller's to check)."""
    # The script beside this interpreter: the venv may be used without being activated (as CI does).
    beside = Path(sys.executable).parent / "ring-ext"
    exe = str(beside) if beside.exists() else shutil.which("ring-ext")
    assert exe, "the ring-ext console script is not installed"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, check=False)

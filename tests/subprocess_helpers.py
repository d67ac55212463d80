"""Run code in a fresh interpreter (fresh plugin state) and read its last JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


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

"""Shared fixtures: a fresh-interpreter runner, and a scratch dist-info to install throwaway plugins."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import verl  # noqa: F401  (loads ring-ext's plugins once, as every verl process does)


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


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install plugins as real distributions (dist-info + entry points) on a scratch sys.path entry."""

    def install(dist: str, entry_name: str, module: str, source: str) -> None:
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        info = tmp_path / f"{dist.replace('-', '_')}-0.0.1.dist-info"  # wheel naming: one '-' only
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
        (info / "entry_points.txt").write_text(f"[ring_ext.plugins]\n{entry_name} = {module}\n")
        importlib.invalidate_caches()

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return install

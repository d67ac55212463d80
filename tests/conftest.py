"""Shared fixtures: a scratch dist-info to install throwaway plugins."""

from __future__ import annotations

import importlib
import textwrap
from pathlib import Path

import pytest
import verl  # noqa: F401  (loads ring-ext's plugins once, as every verl process does)


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

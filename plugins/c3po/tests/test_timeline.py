"""The timeline plot of a c3po run (`python -m ring_ext_c3po.timeline`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ring_ext_c3po.timeline import load, main

ROWS = [{"step": 2, "key": "a_0_0", "purged": False, "dispatch_step": 1,
         "segments": [[0, 5, 0.0, 1.0], [1, 3, 2.0, 2.5]]},
        {"step": 2, "key": "b_0_0", "purged": True, "dispatch_step": 1, "segments": [[0, 9, 0.0, 1.5]]}]


def test_plot_writes_a_png_for_a_run(tmp_path: Path) -> None:
    src = tmp_path / "c3po_timeline.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "t.png"
    assert main([str(src), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["key"] for r in load(src)] == ["a_0_0", "b_0_0"]


def test_an_empty_timeline_is_refused_with_the_reason(tmp_path: Path) -> None:
    src = tmp_path / "empty.jsonl"
    src.write_text("")
    with pytest.raises(ValueError, match="holds no requests"):
        load(src)

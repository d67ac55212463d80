"""`ring_ext.verl_run`'s reading of verl's file logger while a run writes it (no training here)."""

from __future__ import annotations

import json
from pathlib import Path

from ring_ext.verl_run import _RecordTail


def test_tail_returns_each_complete_record_once_and_waits_for_a_half_written_line(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    tail = _RecordTail(path)
    assert tail.poll() == []  # the logger has not created the file yet
    first, second = {"step": 1, "data": {"x": 0.5}}, {"step": 2, "data": {"x": 0.25}}
    line = json.dumps(second)
    path.write_text(json.dumps(first) + "\n" + line[:7])
    assert tail.poll() == [first]
    assert tail.poll() == []  # nothing new, the partial line is not parsed
    with path.open("a") as f:
        f.write(line[7:] + "\n")
    assert tail.poll() == [second]
    assert tail.records == [first, second]

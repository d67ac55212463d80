"""c3po_cut_across_nodes.py's machinery (the runs themselves need ~20 min: not in CI)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import c3po_cut_across_nodes as nodes  # noqa: E402


def test_summary_keeps_every_step_and_takes_the_median_from_step_two() -> None:
    steps = [{"c3po/budget_used": 3.0, "c3po/cut_s": 0.1}, {"c3po/budget_used": 1.1}, {"c3po/budget_used": 1.3},
             {"c3po/budget_used": 1.2, "c3po/cut_s": 0.4}]
    out = nodes.summary(steps)
    assert out["c3po/budget_used"] == {"steps": [3.0, 1.1, 1.3, 1.2], "median_from_step_2": 1.2}  # step 1 left out
    assert out["c3po/cut_s"]["median_from_step_2"] == 0.4  # steps without the metric are skipped
    assert out["c3po/report_delay_s"] == {"steps": [None] * 4, "median_from_step_2": None}


def test_the_resumed_process_uses_the_first_ones_checkpoint_dir(tmp_path: Path) -> None:
    first, second = nodes.overrides(2, tmp_path / "one_node"), nodes.overrides(4, tmp_path / "one_node")
    assert first[0] == "+recipe=ring1t" and "trainer.total_training_steps=2" in first
    assert {o for o in first if "default_local_dir" in o} == {o for o in second if "default_local_dir" in o}
    with pytest.raises(SystemExit):
        nodes.main(["--steps", "4", "--restart-at", "4", "--out", str(tmp_path / "x")])

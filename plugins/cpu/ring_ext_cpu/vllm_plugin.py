"""ring-ext-cpu's vLLM general plugin (`vllm.general_plugins`): vLLM runs it in every engine process.

vLLM-CPU repacks each linear weight for oneDNN/AMX/zentorch after loading and, for linear layers,
replaces `layer.weight` by an empty tensor (vllm/model_executor/layers/utils.py,
`dispatch_cpu_unquantized_gemm(..., remove_weight=True)`). verl's weight push then fails with
"'Parameter' object has no attribute 'weight_loader'" on the first sync. Keeping the live weight and
calling `F.linear` on it lets every push land in place, at the price of the packed kernels, which tiny
models do not need.

MoE: vLLM-CPU's experts prepack their weight stacks for a grouped GEMM after loading, but vLLM runs that step only
on the first load (`UnquantizedFusedMoEMethod._setup_kernel`: `fused_experts.process_weights_after_loading` when
`moe_kernel is None`). A reload (verl's push: `load_weights` + `process_weights_after_loading`) leaves the stacks in
checkpoint layout under a kernel that reads them prepacked: every MoE log-prob is off after the first sync. The
patch reruns the experts' step on reloads too.
"""

from __future__ import annotations

from typing import Any

from ring_ext.patching import patch_once


def _linear_on_live_weight(x: Any, weight: Any, bias: Any) -> Any:
    import torch.nn.functional as F

    return F.linear(x, weight, bias)


def _keep_linear_weights(original: Any) -> Any:
    def dispatch_keeping_weight(layer: Any, remove_weight: bool) -> None:
        if layer.weight.ndim != 2:  # MoE expert stacks and convs: vLLM's own path keeps them
            original(layer, remove_weight)
            return
        layer.cpu_linear = _linear_on_live_weight

    return dispatch_keeping_weight


def _prepack_experts_on_reload(original: Any) -> Any:
    def setup_kernel(self: Any, layer: Any, w13: Any, w2: Any) -> None:
        reload = self.moe_kernel is not None
        original(self, layer, w13, w2)
        if reload:  # the first load ran it inside `original`
            self.moe_kernel.fused_experts.process_weights_after_loading(layer)

    return setup_kernel


def register() -> None:
    from ring_ext.device import on_cpu

    if not on_cpu():
        return
    from vllm.model_executor.layers import utils
    from vllm.model_executor.layers.fused_moe import unquantized_fused_moe_method as moe

    patch_once(utils, "dispatch_cpu_unquantized_gemm", _keep_linear_weights)
    patch_once(moe.UnquantizedFusedMoEMethod, "_setup_kernel", _prepack_experts_on_reload)

"""ring-ext-cpu's vLLM general plugin (`vllm.general_plugins`): vLLM runs it in every engine process.

It applies the workarounds of ring_ext_cpu.workarounds marked `in_vllm` (vLLM-CPU's defects: linear weights dropped
after packing, MoE expert stacks not repacked on reload); `ring-ext plugins` lists them with the others.
"""

from __future__ import annotations


def register() -> None:
    from ring_ext.device import on_cpu

    if not on_cpu():
        return
    from ring_ext_cpu.workarounds import WORKAROUNDS

    for workaround in WORKAROUNDS:
        if workaround.in_vllm:
            workaround.apply()

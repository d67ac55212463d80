"""Whether verl's level-2 sleep before a sync is harmless under the in-place sync. No verl, no vLLM: torch only.

verl 0.9.1 puts vLLM to sleep at level 2 before each sync in the hybrid and standalone modes
(`vLLMHttpServer._resolve_sleep_level`). On a GPU, level 2 discards every allocation of vLLM's weights pool: the
virtual addresses stay, the physical pages are replaced at wake-up, so their bytes are garbage. vLLM saves
`named_buffers()` to host memory before and copies them back after (vllm/v1/worker/gpu_worker.py, `sleep` and
`wake_up`); a complete in-place sync rewrites every parameter byte (`Plan.check_covers`). What else the model holds
in a tensor, a plain attribute that a kernel's after-loading step derived from the weights, comes back as garbage and
nothing rewrites it: with such a tensor the sleep must be level 1 (weights kept in host memory).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import torch

logger = logging.getLogger("ring_ext")


def _attribute_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors a module holds as plain attributes (or in a list, tuple or dict attribute): not registered."""
    for mname, module in model.named_modules():
        for attr, value in vars(module).items():
            items = (value.items() if isinstance(value, dict) and not attr.startswith("_")
                     else enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)])
            for key, v in items:
                if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter):
                    name = f"{mname}.{attr}" if mname else attr
                    yield (name if key is None else f"{name}[{key!r}]"), v


def on_device(name: str, t: torch.Tensor) -> bool:
    return t.device.type != "cpu"  # host tensors (the attention's `_k_scale_cpu`) are outside the pool: kept


def lost_at_level2(model: torch.nn.Module, pooled: Callable[[str, torch.Tensor], bool] = on_device,
                   kv_caches: Iterable[torch.Tensor] = ()) -> list[str]:
    """Tensors a level-2 sleep discards (`pooled`) that neither a sync rewrites nor vLLM restores.

    A tensor counts as restored when its storage is a parameter's or a registered buffer's (a view of either reads
    the rewritten or restored bytes). The KV cache (the attention layers hold it as an attribute) is left out: every
    sleep level discards it and verl resets the prefix cache after a sync."""
    kept = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    kept |= {c.untyped_storage().data_ptr() for c in kv_caches}
    return sorted(name for name, t in _attribute_tensors(model)
                  if pooled(name, t) and t.numel() and t.untyped_storage().data_ptr() not in kept)


def sleep_level(requested: int, lost: list[str]) -> int:
    """The level to sleep at: the requested one, unless level 2 would lose tensors nothing restores."""
    return 1 if requested >= 2 and lost else requested


def lowered_sleep(original):
    """Wraps vLLM's GPU `Worker.sleep` (vllm/v1/worker/gpu_worker.py; vLLM-CPU's worker overrides it with a no-op):
    on a worker that syncs through astate, a level-2 sleep that would lose tensors sleeps at level 1, said once."""

    def sleep(self, level: int = 1) -> None:
        astate = type(getattr(self, "weight_transfer_engine", None)).__name__ == "AStateWeightTransferEngine"
        lost: list[str] = []
        if level >= 2 and astate:
            runner = self.model_runner
            lost = lost_at_level2(runner.model, on_device, getattr(runner, "kv_caches", ()))
        new = sleep_level(level, lost)
        if new != level and not getattr(self, "_ring_ext_sleep_said", False):
            self._ring_ext_sleep_said = True
            logger.warning("ring-ext astate: vLLM sleeps at level %d, not %d: level 2 would discard %s, which no "
                           "sync rewrites and vLLM does not restore (weights stay in host memory while asleep)",
                           new, level, lost[:5] + (["..."] if len(lost) > 5 else []))
        return original(self, level=new)

    return sleep

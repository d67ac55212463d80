"""Whether this process trains on an accelerator or on the CPU path (ring-ext-cpu).

`RING_EXT_DEVICE=cpu|cuda` overrides detection (e.g. to test the CPU path on a GPU host).
"""

from __future__ import annotations

import functools
import os

_ALLOWED = ("cpu", "cuda")


@functools.cache
def training_device() -> str:
    forced = os.environ.get("RING_EXT_DEVICE", "").strip().lower()
    if forced:
        if forced not in _ALLOWED:
            raise ValueError(f"RING_EXT_DEVICE={forced!r} is not one of {_ALLOWED}")
        return forced
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def on_cpu() -> bool:
    return training_device() == "cpu"

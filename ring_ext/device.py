"""Whether the run trains on an accelerator or on the CPU path (ring-ext-cpu), decided once, in the driver.

`RING_EXT_DEVICE=cpu|cuda` overrides detection (e.g. to test the CPU path on a GPU host). Otherwise the driver
detects it and `hand_device_to_every_process` (a start-up check, before Ray starts) sets RING_EXT_DEVICE for every
process of the run: in the driver's environment, which a local Ray cluster inherits, and in the job's Ray
runtime_env, which reaches an existing cluster's workers. So verl's TaskRunner, a Ray actor with no GPU (or one
on a CPU-only head node), resolves `${ring_ext.accel:...}` to the driver's device, not its own.
"""

from __future__ import annotations

import functools
import os
from typing import Any

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


def hand_device_to_every_process(config: Any) -> None:
    """Start-up check: the driver's device for the whole run (see the module docstring)."""
    from omegaconf import OmegaConf

    device = training_device()
    os.environ["RING_EXT_DEVICE"] = device
    OmegaConf.update(config, "ray_kwargs.ray_init.runtime_env.env_vars.RING_EXT_DEVICE", device, force_add=True)

"""ring-ext hook implementation of ring-ext-astate: the ``astate`` verl checkpoint engine and the in-place sync.

In-place: a vLLM engine started with ``weight_transfer_config={"backend": "astate"}`` builds ring-ext-astate's
weight-transfer engine in each worker (`vllm_plugin`), and verl's `ServerAdapter.update_weights` writes into it
(`adapter`), in every trainer mode.
"""

from __future__ import annotations

import logging
from typing import Any

from ring_ext.hookspecs import hookimpl
from ring_ext.registrar import Registrar

logger = logging.getLogger("ring_ext")
SETTING = "actor_rollout_ref.rollout.engine_kwargs.vllm.weight_transfer_config"


def check_inplace_config(config: Any) -> None:
    """In the driver: the in-place options parse, astate is not asked for where it cannot run, and the start-up
    log says which sync runs, and why when it is verl's copy."""
    from ring_ext.device import training_device
    from ring_ext_astate.adapter import in_place
    from ring_ext_astate.options import SECTION, AStateOptions
    from ring_ext_astate.support import unavailable

    rollout = config.actor_rollout_ref.rollout
    options = AStateOptions.from_rollout_config(rollout)
    why_not = unavailable(training_device()) if rollout.name == "vllm" else f"rollout.name={rollout.name}"
    if not in_place(rollout):
        if options.in_place_knobs_set():
            logger.warning("ring-ext: %s.%s set, but vLLM's weight_transfer_config.backend is not astate: the "
                           "in-place sync does not run, so they are not used", SECTION,
                           "/".join(options.in_place_knobs_set()))
        logger.warning("ring-ext: weight sync = verl's copy (ServerAdapter.update_weights: buckets into the vLLM "
                       "worker's load_weights), not astate in place: %s", why_not or (
                           f"{SETTING} is not {{backend: astate}}, as set (astate can run here)"))
        return
    if rollout.name != "vllm":
        raise ValueError(f"astate's in-place sync writes into vLLM's parameters; rollout.name={rollout.name}")
    if why_not is not None:
        raise ValueError(f"{SETTING}.backend=astate, but astate's in-place sync cannot run here: {why_not}. "
                         f"Set {SETTING}=null (verl's copy)")
    logger.warning("ring-ext: weight sync in place through astate into every vLLM worker's parameters: %s", options)


@hookimpl
def ring_ext_register(registrar: Registrar) -> None:
    # a string: the engine module imports verl's checkpoint engines, which only load when verl needs them
    registrar.checkpoint_engine("astate", "ring_ext_astate.engine:AStateCheckpointEngine")
    registrar.startup_check("astate_inplace", check_inplace_config)
    registrar.patch(
        "verl.workers.rollout.vllm_rollout.vllm_rollout:ServerAdapter.update_weights",
        "ring_ext_astate.adapter:in_place_update_weights",
        "server_adapter_in_place",
        "verl/workers/rollout/vllm_rollout/vllm_rollout.py ServerAdapter.update_weights copies every tensor into a "
        "bucket for the vLLM worker's load_weights; with weight_transfer_config.backend=astate it writes the rank's "
        "slices into the worker's parameters instead (ring_ext_astate.adapter)")
    registrar.patch(  # applied in vLLM's processes by the vllm.general_plugins entry point; listed here
        "vllm.v1.worker.gpu_worker:Worker.sleep",
        "ring_ext_astate.sleep:lowered_sleep",
        "level2_sleep_checked",
        "vllm/v1/worker/gpu_worker.py Worker.sleep at verl's level 2 discards the weights pool; on a worker that "
        "syncs through astate it sleeps at level 1 where level 2 would lose a tensor that no sync rewrites and vLLM "
        "does not restore (ring_ext_astate.sleep)")


"""ring-ext-astate's vLLM general plugin (`vllm.general_plugins`): vLLM runs it in every engine process.

It registers the ``astate`` weight-transfer engine with vLLM's own factory, so a worker started with
``weight_transfer_config={"backend": "astate"}`` builds one next to its model, and lowers such a worker's level-2
sleep to level 1 where level 2 would lose tensors no sync rewrites (`ring_ext_astate.sleep`). The engine needs
vLLM >= 0.29 (the sharded-RDT placeholders `FakeRDTTensor` its plan is recorded with); on older releases (verl
0.9.1's GPU stack pins 0.24.0) the backend is not registered, a warning says why, and a run asking for it fails at
engine start naming it.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("ring_ext")


def register() -> None:
    try:
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
        from vllm.distributed.weight_transfer.sharded_rdt_fake import FakeRDTTensor  # noqa: F401  (vLLM >= 0.29)
    except ImportError as e:
        logger.warning("ring-ext astate: this vLLM has no weight-transfer interface astate can use (%s)", e)
        return
    try:
        WeightTransferEngineFactory.register_engine("astate", "ring_ext_astate.vllm_engine",
                                                    "AStateWeightTransferEngine")
    except ValueError:  # registered already (the plugin ran twice in this process)
        pass
    from ring_ext.patching import patch_after_import

    patch_after_import("vllm.v1.worker.gpu_worker:Worker.sleep", "ring_ext_astate.sleep:lowered_sleep")

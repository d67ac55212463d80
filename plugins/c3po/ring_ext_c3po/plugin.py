"""ring-ext hook implementation of ring-ext-c3po: the `c3po` v1 trainer mode, its config section, a startup check."""

from __future__ import annotations

import logging
import os
from typing import Any

from ring_ext.hookspecs import hookimpl
from ring_ext.patching import after_import, resolve
from ring_ext.registrar import Registrar

logger = logging.getLogger("ring_ext")


def check_c3po_config(config: Any) -> None:
    """In the driver, before Ray: the knobs parse, the budget fits the pool, checkpoints are shared across nodes."""
    v1 = config.trainer.get("v1", {})
    if v1.get("trainer_mode") != "c3po":
        if v1.get("c3po", None):
            logger.warning("ring-ext: trainer.v1.c3po is set but trainer.v1.trainer_mode=%s: the C3PO++ knobs are "
                           "not used (trainer.v1.trainer_mode=c3po turns them on)", v1.get("trainer_mode"))
        return
    from ring_ext_c3po.rules import C3POConfig

    c3po = C3POConfig.from_trainer_config(config)
    rollout = config.actor_rollout_ref.rollout
    c3po.check_reachable(int(rollout.n), int(rollout.response_length))
    actor = config.actor_rollout_ref.actor
    if not actor.use_dynamic_bsz and int(actor.ppo_micro_batch_size_per_gpu or 1) > 1:
        raise ValueError(
            "trainer.v1.trainer_mode=c3po trains every finished group, a number that varies per step, and verl splits "
            "a batch into micro-batches of a fixed count only when it divides evenly: set "
            "actor_rollout_ref.actor.use_dynamic_bsz=true (micro-batches by tokens)")
    if int(config.trainer.nnodes) > 1 and not os.path.isabs(str(config.trainer.default_local_dir)):
        raise ValueError(
            f"trainer.v1.trainer_mode=c3po on {config.trainer.nnodes} nodes: the rollout clients spool partial "
            f"trajectories under trainer.default_local_dir={config.trainer.default_local_dir!r}, a relative path each "
            "node resolves on its own disk; give an absolute path on a file system every node mounts")
    if c3po.carry == "keep":
        if rollout.enable_prefix_caching:
            raise ValueError(
                "trainer.v1.c3po.carry=keep reuses the kept requests' KV cache across weight updates; with the prefix "
                "cache on, new requests would also reuse blocks the old weights computed, and vLLM cannot reset it "
                "while the kept requests hold blocks: set actor_rollout_ref.rollout.enable_prefix_caching=false")
        if rollout.free_cache_engine:
            raise ValueError(
                "trainer.v1.c3po.carry=keep holds the requests and their KV cache in the engine while the trainer "
                "trains; sleeping the engine (rollout.free_cache_engine=true) would discard them: set "
                "actor_rollout_ref.rollout.free_cache_engine=false, or use carry=abort")
    logger.warning("ring-ext: C3PO++ partial rollouts on: %s, rollout.n=%s, max_response_length=%s",
                   c3po.describe(), rollout.n, rollout.response_length)


@hookimpl
def ring_ext_register(registrar: Registrar) -> None:
    # a string: the mode imports verl's v1 trainer, which only the TaskRunner loads
    registrar.trainer_mode("c3po", "ring_ext_c3po.trainer:C3POTrainer")
    registrar.config_section("trainer.v1.c3po", "ring_ext_c3po.rules:C3POConfig")
    registrar.startup_check("c3po_config", check_c3po_config)
    registrar.patch(
        "verl.experimental.agent_loop.agent_loop:AgentLoopWorker._compute_score",
        "ring_ext_c3po.client:skip_scoring_purged",
        "purged_samples_not_scored",
        "verl/experimental/agent_loop/agent_loop.py AgentLoopWorker._compute_score scores every sample; a C3PO++ "
        "sample purged at a cut (its group is evicted unread) gets reward 0 without the reward call")
    module = "verl.workers.rollout.vllm_rollout.vllm_async_server"
    after_import(module, resolve("ring_ext_c3po.keep:install"))
    after_import(module, resolve("ring_ext_c3po.adaptive:install"))
    registrar.workaround("in_flight_progress", f"{module.replace('.', '/')}.py vLLMHttpServer gains "
                         "in_flight_progress: the adaptive cut (trainer.v1.c3po.adaptive_cut) reads how far each "
                         "request in the engine has decoded")
    registrar.workaround("cut_keeps_requests", f"{module.replace('.', '/')}.py vLLMHttpServer gains "
                         "pause_keeping_requests: the cut under trainer.v1.c3po.carry=keep pauses the engine keeping "
                         "its requests and KV cache instead of verl's abort_all_requests")
    for method, wrap, name, why in (
            ("set_global_steps", "record_switches", "weight_version_switch_points",
             "with carry=keep a request spans weight versions inside the engine: each sync records how many tokens "
             "every kept request decoded under the old version"),
            ("generate", "report_switches", "switch_points_returned",
             "the switch points go back with the request, so its tokens get their versions")):
        registrar.patch(f"{module}:vLLMHttpServer.{method}", f"ring_ext_c3po.keep:{wrap}", name,
                        f"{module.replace('.', '/')}.py vLLMHttpServer.{method}: {why}")
    registrar.patch(
        "verl.experimental.agent_loop.agent_loop:AgentLoopWorker._run_agent_loop",
        "ring_ext_c3po.identity:identify_requests",
        "rollout_request_knows_its_uid",
        "verl/experimental/agent_loop/agent_loop.py AgentLoopWorker._run_agent_loop gets the sample's uid and "
        "session id but the LLM client's generate() does not; C3PO++ keys a group by its uid (two groups of one "
        "prompt can be in flight), so the wrapper puts them in a context variable the client reads")
    registrar.patch(
        "verl.trainer.ppo.padding_utils:construct_minimal_padding_template",
        "ring_ext_c3po.padding:lag_cut_to_the_padding_row",
        "padding_row_lag_cut_to_one_token",
        "verl/trainer/ppo/padding_utils.py construct_minimal_padding_template rebuilds the per-token fields it "
        "knows at one token for a dp padding row but keeps C3PO++'s rollout_policy_lag at the source row's length, "
        "which IcePop's per-lag diagnostics then refuse")

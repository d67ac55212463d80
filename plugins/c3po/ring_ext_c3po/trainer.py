"""`trainer.v1.trainer_mode=c3po`: verl's colocated partial-rollout trainer with C3PO++'s pools.

Thin, as verl's own modes: the rules live in `rules.py`, the rollout side in `client.py`, the pools in `buffer.py`,
the tight cut in `gate.py`. What this class adds to `colocate_async`'s cycle (abort, train, sync, resume):
- the budget gate (a Ray actor beside the rollout servers) handed to every client, reset before generation resumes;
- Omega groups in flight from the start (and after a restart), topped up by the buffer while the engine decodes;
- a variable batch trained in whole mini-batches: the batch holds every finished group, a number that varies per
  step, so it is split into `rules.mini_batches(groups, ppo_mini_batch_size)` optimizer steps of whole groups with no
  padding on one data-parallel rank (with dp > 1, at most dp - 1 padding rows per mini-batch). verl's lr scheduler
  steps once per training step, so schedules count steps as in any mode; an "epoch" is nominal (the dataloader
  cycles and a step consumes as many prompts as the top-ups took);
- the partial trajectories of a checkpoint (`c3po_partials.json`), restored token by token on resume.
verl's own staleness bound (`max_off_policy_threshold`) is replaced by the retention bound in this mode.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import ray
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_colocate_async import PPOTrainerColocateAsync
from verl.utils.debug import marked_timer

from ring_ext.shared_dir import require_shared
from ring_ext_c3po.buffer import C3POReplayBuffer
from ring_ext_c3po.client import MODE, C3POLLMServerClient, spool_for
from ring_ext_c3po.gate import BudgetGate
from ring_ext_c3po.rules import C3POConfig, mini_batches

logger = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 60.0  # after the last step: in-flight requests end at their next cut, which the abort makes now


def _train_prompt_tags() -> dict[str, dict]:
    """TransferQueue tags of the training partition's prompt groups (status pending/running/finished/failure)."""
    import transfer_queue as tq

    items = (tq.kv_list("train") or {}).get("train", {})
    return {uid: tag for uid, tag in items.items() if tag.get("is_prompt")}


def _decoding() -> list[str]:
    return [uid for uid, tag in _train_prompt_tags().items() if tag.get("status") in ("pending", "running")]


@register_trainer(MODE)
class C3POTrainer(PPOTrainerColocateAsync):
    """Registered with verl by the ring-ext-c3po plugin."""

    _gate: Any = None
    _mini_batches = 1

    def _build_replay_buffer(self) -> C3POReplayBuffer:
        # before any worker starts: the clients on every node spool where this process snapshots
        require_shared(str(self.config.trainer.default_local_dir), "trainer.default_local_dir",
                       "C3PO++'s rollout clients on every node spool partial trajectories there for the trainer's "
                       "checkpoints")
        c3po = C3POConfig.from_trainer_config(self.config)
        rollout = self.config.actor_rollout_ref.rollout
        c3po.check_reachable(int(rollout.n), int(rollout.response_length))
        timeline = os.path.join(self.config.trainer.default_local_dir, "c3po_timeline.jsonl") if c3po.timeline else None
        return C3POReplayBuffer(
            trainer_mode=self.trainer_mode, trainer_config=self.config.trainer.v1.get(MODE, {}),
            max_off_policy_threshold=None, max_off_policy_strategy="drop",
            sampler_kwargs=self.config.trainer.v1.sampler.sampler_kwargs, poll_interval=c3po.poll_interval_s,
            refill_fn=self._add_prompts_to_generate, c3po=c3po, timeline_path=timeline,
            abort_fn=self._cut_phase)

    def _cut_phase(self) -> None:
        """The trainer's own cut, once the pool holds Phi (a no-op pause where the gate already cut)."""
        if self._gate is not None:
            ray.get(self._gate.mark_cut.remote())
            # adaptive_cut: the gate may be letting the crossing's requests finish; then every finished group trains
            self.replay_buffer.cut_skipped = ray.get(self._gate.settle.remote())
        c3po = self.replay_buffer.c3po
        if c3po.carry == "keep":  # pause keeping requests and KV cache (keep.py), on every replica
            ray.get([s.pause_keeping_requests.remote(c3po.max_retention)
                     for s in self.llm_server_manager.server_handles])
        else:
            self.checkpoint_manager.abort_replicas()

    def on_sample_end(self) -> None:
        """carry: keep -- the engines stay paused with their requests through training and the in-place sync;
        verl's abort and sleep (which would drop the requests and wait for them to drain) are not run, and the
        buffer's sample() already paused them (`_cut_phase`, its abort_fn, runs on every sample)."""
        if self.replay_buffer.c3po.carry != "keep":
            with marked_timer("sample_end", self.timing_raw):  # verl's abort (a no-op after the cut) and sleep
                return super().on_sample_end()
        if self.curr_step_profile:
            self._stop_rollout_profiling()

    def get_llm_client(self) -> C3POLLMServerClient:
        if self._gate is None:
            servers = list(self.llm_server_manager.server_handles)
            gate_cls = ray.remote(num_cpus=0)(BudgetGate)
            rollout = self.config.actor_rollout_ref.rollout
            self._gate = gate_cls.remote(int(rollout.n), self.replay_buffer.c3po.token_budget, servers,
                                         self.replay_buffer.c3po.max_retention,
                                         int(rollout.max_num_seqs) * len(servers), self.replay_buffer.c3po.carry,
                                         self.replay_buffer.c3po.adaptive_cut, self.replay_buffer.c3po.admission)
        return self.llm_server_manager.get_client(client_cls=C3POLLMServerClient, gate=self._gate)

    def fit(self, agent_loop_manager: Any) -> None:
        super().fit(agent_loop_manager)
        self._end_rollouts()

    def _end_rollouts(self) -> None:
        """After the last step the pool still has Omega groups decoding under the last weights (verl's step end
        resumed generation). Left alone they outlive the run: its actors exit under them and each request dies
        with a traceback. So the gate is closed, every replica aborts and rejects what arrives behind it, each
        client ends its request at that cut (unscored, untrained: the last checkpoint already holds the partials),
        and the run returns once no group is decoding."""
        if self._gate is None:
            return
        start, in_flight = time.monotonic(), len(_decoding())
        ray.get(self._gate.close.remote())
        self.checkpoint_manager.abort_replicas(reject_request=True)
        while decoding := _decoding():
            if time.monotonic() - start > DRAIN_TIMEOUT_S:
                logger.warning("C3PO++: %d prompt groups still decoding %.0f s after the last step; the run ends "
                               "under them", len(decoding), DRAIN_TIMEOUT_S)
                return
            time.sleep(0.05)
        logger.warning("C3PO++: rollouts ended after the last step: %d prompt groups in flight stopped in %.2f s",
                       in_flight, time.monotonic() - start)

    def on_train_begin(self) -> None:
        carried = self.replay_buffer.carry_over(self.global_steps)  # resumed: the checkpoint's finished groups
        if self._gate is not None:
            ray.get(self._gate.restore.remote(carried))  # they count first, as before the stop
            ray.get(self._gate.open.remote())
        self.replay_buffer.top_up()  # Omega groups in flight; restored in-flight groups count towards it

    def prepare_step(self) -> dict:
        self.replay_buffer._sync_metadata_from_transfer_queue()
        return {"c3po/prompts_added_at_step_start": self.replay_buffer.top_up(),
                "c3po/partials_unclaimed": spool_for(self.config).unclaimed()}  # 0 once restored ones resumed

    def on_step_end(self) -> None:
        carried = self.replay_buffer.carry_over(self.global_steps + 1)
        if self._gate is not None:  # a new phase before generation resumes under the new weights
            seen = ray.get(self._gate.next_phase.remote(carried))
            seen |= {"c3po/deferred_tokens": float(carried),  # finished, not trained: the next phase's C
                     "c3po/groups_deferred": float(self.replay_buffer.groups_deferred)}
            self._pending_sync_metrics = {**(getattr(self, "_pending_sync_metrics", None) or {}), **seen}
        super().on_step_end()
        if self._gate is not None:  # generation resumed: the next phase's clock starts
            ray.get(self._gate.open.remote())

    def on_validate_end(self) -> None:
        super().on_validate_end()
        if self._gate is not None:  # validation requests went through the same clients: not this budget's
            ray.get(self._gate.next_phase.remote(self.replay_buffer.deferred_tokens))
            ray.get(self._gate.open.remote())

    # a variable batch in whole mini-batches
    def _balance_batch(self, batch: Any, metrics: dict, *args: Any, **kwargs: Any) -> Any:
        n = int(self.config.actor_rollout_ref.rollout.n)
        groups = math.ceil(len(batch.keys) / n)
        self._mini_batches = mini_batches(groups, int(self.config.actor_rollout_ref.actor.ppo_mini_batch_size))
        metrics["c3po/optimizer_steps"] = self._mini_batches
        return super()._balance_batch(batch, metrics, *args, **kwargs)

    def _get_required_batch_multiple(self, dp_size: int) -> int:
        if self.use_critic:
            return super()._get_required_batch_multiple(dp_size)
        return self._mini_batches * math.lcm(dp_size, int(self.config.actor_rollout_ref.rollout.n))

    def _update_actor(self, batch: Any, metrics: dict) -> Any:
        actor, n = self.config.actor_rollout_ref.actor, int(self.config.actor_rollout_ref.rollout.n)
        configured = actor.ppo_mini_batch_size
        actor.ppo_mini_batch_size = len(batch.keys) // self._mini_batches // n  # prompts per mini-batch
        try:
            return super()._update_actor(batch, metrics)
        finally:
            actor.ppo_mini_batch_size = configured

    # checkpoints carry the partial trajectories
    def _save_checkpoint(self) -> None:
        """verl saves the TransferQueue pools (finished groups kept, in-flight prompts re-issued on resume);
        c3po_pool.json lists the prompt groups the checkpoint holds, c3po_partials.json the requests cut short by
        this step's abort, with their tokens (the clients spooled them during training, which follows the cut)."""
        super()._save_checkpoint()
        pool = {uid: tag.get("status") for uid, tag in _train_prompt_tags().items()}
        partials = spool_for(self.config).snapshot()
        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        for name, payload in [("c3po_pool.json", {"global_steps": self.global_steps, "groups": pool}),
                              ("c3po_partials.json", {"global_steps": self.global_steps, "partials": partials})]:
            with open(os.path.join(folder, name), "w") as f:
                json.dump(payload, f)

    def _load_checkpoint(self) -> None:
        """Stage the loaded checkpoint's partial trajectories for the re-issued requests to claim (none: a fresh
        run, and a stale spool of an earlier process is cleared)."""
        super()._load_checkpoint()
        trainer, partials = self.config.trainer, []
        if self.global_steps > 0:
            folder = (trainer.resume_from_path if trainer.resume_mode == "resume_path"
                      else os.path.join(trainer.default_local_dir, f"global_step_{self.global_steps}"))
            path = os.path.join(os.path.abspath(folder), "c3po_partials.json")
            if os.path.exists(path):
                with open(path) as f:
                    partials = json.load(f)["partials"]
        staged = spool_for(self.config).stage(partials)
        logger.warning("C3PO++: %d partial trajectories staged to resume token by token", staged)

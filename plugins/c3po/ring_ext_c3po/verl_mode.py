"""C3PO++ as verl 0.9.1's v1 trainer mode `c3po` (`trainer.v1.trainer_mode=c3po`, knobs `trainer.v1.c3po.*`).

Built on verl's colocated partial-rollout machinery; three thin pieces, the decisions live in `pool` and `resume`:
- `C3POTrainer` keeps Omega prompt groups in flight (top-up before every rollout phase instead of one fixed batch)
  and keeps colocate_async's cycle: abort in-flight requests when the budget is reached, train, sync, resume.
- `C3POReplayBuffer` ends a rollout phase when the finished groups hold >= Phi response tokens and hands ALL of
  them to training; it evicts purged groups (refilled with new prompts) and logs the per-step metrics.
- `C3POLLMServerClient` resubmits aborted requests with the remaining budget, records the weight version of every
  segment (`extra_fields["c3po_segments"]`: [version, tokens, start_s, end_s]) and purges at retention > sigma.
  Each request cut short is spooled (`partials.PartialSpool`): checkpoints hold the partial trajectories, and on
  resume a re-issued request continues from its saved tokens instead of regenerating them.
verl's own staleness bound (`max_off_policy_threshold`) is replaced by the retention bound in this mode.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import defaultdict
from typing import Any, Callable

import numpy as np
import transfer_queue as tq
from verl.trainer.ppo.v1.replay_buffer import ReplayBufferAsync, _accumulate_eviction_metrics
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_colocate_async import PPOTrainerColocateAsync
from verl.utils import normalize_token_ids
from verl.workers.rollout.llm_server import FullyAsyncLLMServerClient, LLMServerClient
from verl.workers.rollout.replica import TokenOutput

from ring_ext_c3po.partials import Partial, PartialSpool, prompt_key
from ring_ext_c3po.pool import C3POModeConfig, top_up, training_batch
from ring_ext_c3po.resume import Next, ResumeTracker, version_lag_counts

logger = logging.getLogger(__name__)
MODE = "c3po"
RESUME_WAIT_S = 0.05  # the load balancer itself waits (1 s steps) while the replicas sync weights


def mode_config(config: Any) -> C3POModeConfig:
    section = config.trainer.v1.get(MODE, None)
    if section is None:
        raise ValueError("trainer.v1.trainer_mode=c3po needs trainer.v1.c3po.token_budget (use +recipe=ring1t_rlvr "
                         "or add +trainer.v1.c3po.token_budget=<tokens>)")
    return C3POModeConfig.from_mapping(dict(section))


def spool_for(config: Any) -> PartialSpool:
    return PartialSpool(os.path.join(os.path.abspath(config.trainer.default_local_dir), "c3po_spool"))


class C3POLLMServerClient(FullyAsyncLLMServerClient):
    """One `ResumeTracker` per request: exact resume budget, per-segment versions, retention purge."""

    async def generate(self, request_id, *, prompt_ids, sampling_params: dict[str, Any], **kwargs: Any) -> TokenOutput:
        prompt_ids = normalize_token_ids(prompt_ids)
        params = dict(sampling_params)  # rewritten per segment: never touch the caller's dict
        key = "max_new_tokens" if "max_new_tokens" in params else "max_tokens"
        limit = params.get(key) or self._configured_response_length()
        if limit is None:
            raise ValueError("C3PO++ needs a response budget: set actor_rollout_ref.rollout.response_length")
        if not hasattr(self, "_c3po"):  # parsed once per client (one per agent-loop worker)
            self._c3po, self._spool = mode_config(self.config), spool_for(self.config)
        limit, sigma, pkey = int(limit), self._c3po.max_retention, prompt_key(prompt_ids)
        tracker = ResumeTracker(limit, sigma)
        out = TokenOutput(token_ids=[], log_probs=[], num_preempted=0)
        saved = self._spool.claim(pkey)  # a partial of this prompt carried across a restart
        if saved is not None:
            saved.check(limit, sigma)
            tracker = ResumeTracker.resumed(limit, sigma, saved.segments, saved.retention)
            out.token_ids, out.log_probs = list(saved.token_ids), list(saved.log_probs or [])
            if saved.routed_experts is not None:
                out.routed_experts = np.asarray(saved.routed_experts)
        restored, cached = tracker.tokens, None
        while True:
            params[key] = tracker.remaining
            start = time.time()
            seg = await LLMServerClient.generate(self, request_id=request_id, prompt_ids=prompt_ids + out.token_ids,
                                                 sampling_params=params, **kwargs)
            new = list(seg.token_ids)
            out.token_ids.extend(new)
            if seg.log_probs is not None:
                out.log_probs.extend(seg.log_probs)
            if seg.routed_experts is not None and new:  # keep earlier routing, append the new tokens' routing
                tail = seg.routed_experts[-len(new):]
                out.routed_experts = tail if out.routed_experts is None else np.concatenate([out.routed_experts, tail])
            out.num_preempted += seg.num_preempted or 0
            out.stop_reason = seg.stop_reason
            cached = seg.extra_fields.get("num_cached_tokens") if cached is None else cached
            step = tracker.record(seg.extra_fields.get("global_steps"), len(new), seg.stop_reason, start, time.time())
            if step is not Next.RESUME:
                self._spool.drop(request_id)
                break
            if tracker.tokens:
                log_probs = [float(x) for x in out.log_probs] if len(out.log_probs) == len(out.token_ids) else None
                self._spool.put(request_id, Partial(
                    pkey, [int(t) for t in out.token_ids], log_probs,
                    [s.to_list() for s in tracker.segments], tracker.retention,
                    None if out.routed_experts is None else np.asarray(out.routed_experts).tolist()))
            await asyncio.sleep(RESUME_WAIT_S)
        versions = [s.version for s in tracker.segments]
        out.extra_fields.update(
            global_steps=versions[-1] if versions else None, min_global_steps=min(versions, default=None),
            max_global_steps=max(versions, default=None), num_cached_tokens=cached,
            c3po_segments=[s.to_list() for s in tracker.segments], c3po_retention=tracker.retention,
            c3po_purged=step is Next.PURGED, c3po_restored_tokens=restored)
        if step is Next.FINISHED and tracker.remaining == 0:
            out.stop_reason = "length"
        return out


def _extra(value: Any) -> dict:
    value = getattr(value, "data", value)
    return value if isinstance(value, dict) else {}


def _uid(key: str) -> str:
    return key.split("_")[0]  # verl's trajectory key: {uid}_{session_id}_{index}


def _train_prompt_tags() -> dict[str, dict]:
    """TransferQueue tags of the training partition's prompt groups (status pending/running/finished/failure)."""
    items = (tq.kv_list("train") or {}).get("train", {})
    return {uid: tag for uid, tag in items.items() if tag.get("is_prompt")}


class C3POReplayBuffer(ReplayBufferAsync):
    """Token-budget sampling over verl's TransferQueue pools; purged groups are evicted like stale ones."""

    def __init__(self, *args: Any, c3po: C3POModeConfig, timeline_path: str | None,
                 abort_fn: Callable[[], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.c3po = c3po
        self.abort_fn = abort_fn  # stops the engine the moment the budget is met (Algorithm 1's cut)
        self.timeline_path = timeline_path
        self._purged: dict[str, bool] = {}  # finished uid -> purged (finished groups never change)
        self._purged_this_step = 0

    def _group_tokens(self, partition_id: str, uids: set[str]) -> dict[str, int]:
        tokens: dict[str, int] = defaultdict(int)
        for key, tag in self.partitions[partition_id].items():
            if _uid(key) in uids:
                tokens[_uid(key)] += int(tag.get("response_len", 0))
        return tokens

    def _read_extra(self, partition_id: str, keys: list[str]) -> list[dict]:
        if not keys:
            return []
        data = tq.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=["extra_fields"])
        return [_extra(v) for v in data["extra_fields"]]

    def _stale_terminal_keys(self, global_steps: int, partition_id: str) -> set[str]:
        if partition_id == "val":
            return set()
        finished = self.finished_keys[partition_id]
        for uid in self._purged.keys() - finished:
            del self._purged[uid]
        new = finished - self._purged.keys()
        keys = [k for k in self.partitions[partition_id] if _uid(k) in new]
        rows = list(zip(keys, self._read_extra(partition_id, keys), strict=True))
        newly = {_uid(k) for k, extra in rows if extra.get("c3po_purged")}  # one purged sample purges its group
        self._purged.update({uid: uid in newly for uid in new})
        self._purged_this_step += len(newly)
        self._append_timeline(global_steps, [(k, e) for k, e in rows if _uid(k) in newly], True)
        return {uid for uid, purged in self._purged.items() if purged}

    def _finished_stats(self, partition_id: str, sampleable: set[str]) -> list[tuple[str, int, int]]:
        steps = self.prompt_global_steps[partition_id]
        tokens = self._group_tokens(partition_id, sampleable)
        return [(uid, int(steps.get(uid, 0)), tokens.get(uid, 0)) for uid in sampleable]

    def _has_enough_samples(self, global_steps: int, partition_id: str, batch_size: int, sampleable_keys: set) -> bool:
        if partition_id == "val":
            return super()._has_enough_samples(global_steps, partition_id, batch_size, sampleable_keys)
        return training_batch(self._finished_stats(partition_id, sampleable_keys), self.c3po.token_budget) is not None

    def sample(self, global_steps: int, partition_id: str, batch_size: int):
        if partition_id == "val":
            return super().sample(global_steps, partition_id, batch_size)
        start = time.time()
        self._purged_this_step = 0
        sampleable, metrics = self.wait_for_sampleable(global_steps, partition_id, batch_size)
        if self.abort_fn is not None:
            # Cut now, then let requests that completed just before the cut land: they belong to this batch.
            self.abort_fn()
            time.sleep(self.poll_interval)
            sampleable, late = self.wait_for_sampleable(global_steps, partition_id, batch_size)
            _accumulate_eviction_metrics(metrics, late, late.get("training/off_policy/evicted_samples", 0))
        uids = training_batch(self._finished_stats(partition_id, sampleable), self.c3po.token_budget)
        assert uids is not None  # wait_for_sampleable returned only once the budget was met
        in_flight = len(self.pending_keys[partition_id]) + len(self.running_keys[partition_id])
        batch = self._materialize_batch(partition_id, uids, dict(self.partitions[partition_id]))
        extras = self._read_extra(partition_id, list(batch.keys))
        metrics.update(self._step_metrics(global_steps, batch, extras, in_flight, time.time() - start))
        self._append_timeline(global_steps, list(zip(batch.keys, extras, strict=True)), False, batch.tags)
        return batch, metrics

    def _step_metrics(self, global_steps: int, batch: Any, extras: list[dict], in_flight: int, wait_s: float) -> dict:
        policy_version = global_steps - 1  # weights in the engine during step s were synced at the end of s - 1
        lag: dict[int, int] = defaultdict(int)
        multi_version = 0
        for extra in extras:
            segments = extra.get("c3po_segments", [])
            multi_version += len({int(s[0]) for s in segments}) > 1
            for k, v in version_lag_counts(segments, policy_version).items():
                lag[k] += v
        tokens = sum(int(tag.get("response_len", 0)) for tag in batch.tags)
        lag_tokens = sum(lag.values()) or 1
        return {
            "c3po/tokens_trained": tokens,
            "c3po/budget_used": tokens / self.c3po.token_budget,
            "c3po/groups_trained": len({_uid(k) for k in batch.keys}),
            "c3po/trajectories_trained": len(batch.keys),
            "c3po/trajectories_multi_version": multi_version,
            "c3po/groups_in_flight_at_cut": in_flight,  # carried into the next step (or purged there)
            "c3po/groups_purged": self._purged_this_step,
            "c3po/version_lag/mean": sum(k * v for k, v in lag.items()) / lag_tokens,
            "c3po/version_lag/max": max(lag, default=0),
            "c3po/stale_token_fraction": sum(v for k, v in lag.items() if k > 0) / lag_tokens,
            "c3po/trainer_wait_s": wait_s,  # the trainer idles while the engine fills the budget
        }

    def _append_timeline(self, global_steps: int, rows: list[tuple[str, dict]], purged: bool,
                         tags: list[dict] | None = None) -> None:
        if not self.timeline_path or not rows:
            return
        os.makedirs(os.path.dirname(self.timeline_path) or ".", exist_ok=True)
        with open(self.timeline_path, "a") as f:
            for i, (key, extra) in enumerate(rows):
                dispatched = tags[i].get("global_steps") if tags else None  # the step its prompt was submitted in
                f.write(json.dumps({"step": global_steps, "key": key, "purged": purged, "dispatch_step": dispatched,
                                    "segments": extra.get("c3po_segments", []),
                                    "restored_tokens": extra.get("c3po_restored_tokens", 0)}) + "\n")


@register_trainer(MODE)
class C3POTrainer(PPOTrainerColocateAsync):
    """`trainer.v1.trainer_mode=c3po`: registered with verl by the ring-ext-c3po plugin."""

    def _build_replay_buffer(self) -> C3POReplayBuffer:
        c3po = mode_config(self.config)
        rollout = self.config.actor_rollout_ref.rollout
        c3po.check_reachable(int(rollout.n), int(rollout.response_length))
        sampler = self.config.trainer.v1.sampler
        timeline = os.path.join(self.config.trainer.default_local_dir, "c3po_timeline.jsonl") if c3po.timeline else None
        logger.warning("C3PO++ active: token_budget=%d max_retention=%d pool_prompts=%d (verl's "
                       "max_off_policy_threshold is not used in this mode)", c3po.token_budget, c3po.max_retention,
                       c3po.pool_prompts)
        return C3POReplayBuffer(
            trainer_mode=self.trainer_mode, trainer_config=self.config.trainer.v1.get(MODE, {}),
            max_off_policy_threshold=None, max_off_policy_strategy="drop", sampler_kwargs=sampler.sampler_kwargs,
            poll_interval=c3po.poll_interval_s, refill_fn=self._add_prompts_to_generate, c3po=c3po,
            timeline_path=timeline, abort_fn=lambda: self.checkpoint_manager.abort_replicas())

    def get_llm_client(self) -> C3POLLMServerClient:
        return self.llm_server_manager.get_client(client_cls=C3POLLMServerClient)

    def _top_up_pool(self) -> int:
        in_flight = sum(t.get("status") in ("pending", "running") for t in _train_prompt_tags().values())
        missing = top_up(in_flight, self.replay_buffer.c3po.pool_prompts)
        if missing:
            self._add_prompts_to_generate(missing)
        return missing

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

    def on_train_begin(self) -> None:
        self._top_up_pool()  # restored in-flight groups (after a resume) count towards Omega

    def prepare_step(self) -> dict:
        return {"c3po/prompts_added": self._top_up_pool(),
                "c3po/partials_unclaimed": spool_for(self.config).unclaimed()}  # 0 once restored ones resumed

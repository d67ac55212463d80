"""C3PO++ on the trainer side: verl's replay buffer over TransferQueue with Algorithm 1's pools.

Where it sits: verl's trainer calls `sample()` once per step. While the engine decodes, each poll evicts purged
and failed groups, tops the inference pool back up to Omega (`rules.top_up`: a finished or purged group is
replaced at once, so the budget is reachable while the data lasts), and returns once the finished groups hold
Phi tokens; then the phase is cut (if the gate has not already) and ALL finished groups form the batch
(`rules.training_batch`). `rules.StallGuard` turns a phase that cannot progress into an error naming why.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from typing import Any, Callable

import torch
import transfer_queue as tq
from verl.trainer.ppo.v1.replay_buffer import ReplayBufferAsync, _accumulate_eviction_metrics
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

from ring_ext.batch_fields import ROLLOUT_POLICY_LAG
from ring_ext_c3po.adaptive import groups_to_admit
from ring_ext_c3po.resume import token_lags, version_lag_counts
from ring_ext_c3po.rules import C3POConfig, StallGuard, budget_reached, staleness, top_up, training_batch


def _extra(value: Any) -> dict:
    value = getattr(value, "data", value)
    return value if isinstance(value, dict) else {}


def _uid(key: str) -> str:
    return key.split("_")[0]  # verl's trajectory key: {uid}_{session_id}_{index}


def _oldest_versions(extras: dict[str, dict]) -> dict[str, int]:
    """Per group (uid), the oldest policy version that decoded any of its tokens."""
    oldest: dict[str, int] = {}
    for key, extra in extras.items():
        for seg in extra.get("c3po_segments", []):
            oldest[_uid(key)] = min(oldest.get(_uid(key), int(seg[0])), int(seg[0]))
    return oldest


class C3POReplayBuffer(ReplayBufferAsync):
    def __init__(self, *args: Any, c3po: C3POConfig, timeline_path: str | None,
                 abort_fn: Callable[[], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.c3po = c3po
        self.abort_fn = abort_fn  # the trainer's own cut, when the gate has not cut already
        self.timeline_path = timeline_path
        self._purged: dict[str, bool] = {}  # finished uid -> purged (finished groups never change)
        self._purged_this_step = self._purged_tokens_this_step = 0
        self._added_this_step = 0
        # finished, not trained (after the last crossing, or before a restart): trained first next step (carry_over)
        self._deferred_uids: frozenset[str] = frozenset()
        self._batch_now: frozenset[str] = frozenset()  # the groups this step trains
        self.deferred_tokens = 0
        self.cut_skipped = False  # adaptive_cut: this phase ended without a cut (set by the trainer's cut)
        self._trained = [0, 0]  # response tokens, groups trained over the run

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
        """Purged groups, evicted as verl evicts stale ones: one purged sample purges its group."""
        if partition_id == "val":
            return set()
        finished = self.finished_keys[partition_id]
        for uid in self._purged.keys() - finished:
            del self._purged[uid]
        new = finished - self._purged.keys()
        keys = [k for k in self.partitions[partition_id] if _uid(k) in new]
        rows = list(zip(keys, self._read_extra(partition_id, keys), strict=True))
        newly = {_uid(k) for k, extra in rows if extra.get("c3po_purged")}
        # a group that already lags more than sigma (rules.staleness) goes whole, before it counts towards Phi; the
        # gate does not count it either (GroupBudget applies the same rule at the completion)
        newly |= {uid for uid, v in _oldest_versions(dict(rows)).items()
                  if staleness(v, global_steps - 1, self.c3po.max_retention) == "purge"}
        self._purged.update({uid: uid in newly for uid in new})
        self._purged_this_step += len(newly)
        self._purged_tokens_this_step += sum(self._group_tokens(partition_id, newly).values())
        self._append_timeline(global_steps, [(k, e) for k, e in rows if _uid(k) in newly], True)
        return {uid for uid, purged in self._purged.items() if purged}

    @property
    def _group_tokens_mean(self) -> float | None:
        """Response tokens per trained group over the run (None before the first batch)."""
        return self._trained[0] / self._trained[1] if self._trained[1] else None

    def _in_flight(self, partition_id: str) -> int:
        """Prompt groups pending or running, on the last poll's snapshot."""
        return len(self.pending_keys[partition_id]) + len(self.running_keys[partition_id])

    @property
    def groups_deferred(self) -> int:
        return len(self._deferred_uids)

    def carry_over(self, next_step: int, partition_id: str = "train") -> int:
        """C for the phase of `next_step`, read as it opens: the tokens of every finished group not trained yet.
        Read then, not when the batch was built: a group whose last request returned just before the cut reaches
        TransferQueue a moment after. One that would lag more than sigma at `next_step` is purged now
        (`rules.staleness`). In a resumed run's first phase this is what the checkpoint holds finished."""
        self._sync_metadata_from_transfer_queue()
        purged = self._stale_terminal_keys(next_step, partition_id)
        self._deferred_uids = frozenset(self.finished_keys[partition_id] - purged - self._batch_now)
        self.deferred_tokens = sum(self._group_tokens(partition_id, set(self._deferred_uids)).values())
        return self.deferred_tokens

    def top_up(self, partition_id: str = "train", reached: bool = False, finished_tokens: int | None = None) -> int:
        """Admit new prompt groups until Omega are pending or running (on the last poll's snapshot); under the
        adaptive cut, only as many as the budget still needs and one (`adaptive.groups_to_admit`), unless the gate
        admits at each completion (`admission: completion`, which applies that limit itself)."""
        in_flight = self._in_flight(partition_id)
        missing = top_up(in_flight, self.c3po.pool_prompts, reached=reached)
        if self.c3po.adaptive_cut and self.c3po.admission == "poll":  # the step start counts the carried tokens
            finished = self.deferred_tokens if finished_tokens is None else finished_tokens
            missing = min(missing, groups_to_admit(finished, in_flight, self._group_tokens_mean,
                                                   self.c3po.token_budget, self.c3po.pool_prompts))
        if missing:
            self.refill_fn(missing)
            self._added_this_step += missing
        return missing

    def wait_for_sampleable(self, global_steps: int, partition_id: str, target_count: int) -> tuple[set[str], dict]:
        if partition_id == "val":
            return super().wait_for_sampleable(global_steps, partition_id, target_count)
        guard, metrics = StallGuard(self.c3po.stall_timeout_s), {}
        while True:
            self._sync_metadata_from_transfer_queue()
            reasons = self._terminal_eviction_reasons(global_steps, partition_id)
            evicted, stale, _, evicted_metrics = self._evict_terminal_groups(global_steps, partition_id, reasons)
            if evicted:
                _accumulate_eviction_metrics(metrics, evicted_metrics, stale)
            sampleable = self._sampleable_terminal_keys(partition_id, reasons)
            tokens = sum(self._group_tokens(partition_id, sampleable).values())
            if budget_reached(tokens, self.c3po.token_budget):
                return sampleable, metrics
            if self.top_up(partition_id, finished_tokens=tokens):
                continue  # re-read: the new groups are pending now
            in_flight = self._in_flight(partition_id)
            progress = (len(self.partitions[partition_id]), len(self.finished_keys[partition_id]),
                        len(self.failure_keys[partition_id]))
            guard.check(progress=progress, in_flight=in_flight, tokens=tokens, config=self.c3po,
                        finished=len(sampleable))
            time.sleep(self.poll_interval)

    def sample(self, global_steps: int, partition_id: str, batch_size: int):
        if partition_id == "val":
            return super().sample(global_steps, partition_id, batch_size)
        start = time.time()
        self._added_this_step = 0  # top-ups while decoding (those at the step's start are reported apart)
        sampleable, metrics = self.wait_for_sampleable(global_steps, partition_id, batch_size)
        reached = time.time()
        if self.abort_fn is not None:
            # Cut now (a no-op pause if the gate already cut), then let requests that completed just before the cut
            # land: they belong to this batch.
            self.abort_fn()
            time.sleep(self.poll_interval)
            sampleable, late = self.wait_for_sampleable(global_steps, partition_id, batch_size)
            _accumulate_eviction_metrics(metrics, late, late.get("training/off_policy/evicted_samples", 0))
        cut = time.time()
        uids, extras = self._batch_uids(global_steps, partition_id, sampleable)
        in_flight = self._in_flight(partition_id)
        batch = self._materialize_batch(partition_id, uids, dict(self.partitions[partition_id]))
        extras = [extras[k] for k in batch.keys]
        metrics.update(self._step_metrics(global_steps, batch, extras, in_flight, time.time() - start))
        # counted from here on: the next step's (`carry_over` purges at this step's end count there)
        self._purged_this_step = self._purged_tokens_this_step = 0
        self._trained[0] += int(metrics["c3po/tokens_trained"])
        self._trained[1] += int(metrics["c3po/groups_trained"])
        self._put_token_lags(global_steps, batch, extras)
        tokens = self._read_tokens(batch) if self.c3po.timeline_tokens and self.timeline_path else None
        self._append_timeline(global_steps, list(zip(batch.keys, extras, strict=True)), False, batch.tags, tokens)
        # where sample()'s time went: the budget met in TransferQueue, the trainer's cut, the batch built
        metrics.update({"c3po/sample/budget_s": reached - start, "c3po/sample/cut_s": cut - reached,
                        "c3po/sample/batch_s": time.time() - cut})
        return batch, metrics

    def _batch_uids(self, global_steps: int, partition_id: str,
                    sampleable: set[str]) -> tuple[list[str], dict[str, dict]]:
        """`rules.training_batch` in completion order (a group completes when its last sample's last segment ends);
        what finished after the crossing stays in TransferQueue and counts first next step (`deferred_tokens`).
        `rules.staleness`: waiting for the next step counts against a group's retention, so a group that finished
        after the crossing and would then lag more than sigma is purged instead of deferred. (One that lags more
        already never gets here: `_stale_terminal_keys` purged it when it finished, before it counted towards Phi.)"""
        keys = [k for k in self.partitions[partition_id] if _uid(k) in sampleable]
        extras = dict(zip(keys, self._read_extra(partition_id, keys), strict=True))
        done_at: dict[str, float] = defaultdict(float)
        for key, extra in extras.items():
            ends = [float(seg[3]) for seg in extra.get("c3po_segments", [])]
            done_at[_uid(key)] = max(done_at[_uid(key)], max(ends, default=0.0))
        tokens = self._group_tokens(partition_id, sampleable)
        # adaptive_cut let the crossing's in-flight requests finish instead of cutting them: every group trains now
        carried = set(sampleable) if self.cut_skipped else self._deferred_uids
        uids = training_batch([(uid, done_at[uid], tokens[uid]) for uid in sampleable], self.c3po.token_budget,
                              carried)
        self.cut_skipped = False
        assert uids is not None  # wait_for_sampleable returned only once the budget was met
        self._batch_now = frozenset(uids)
        cannot_wait = {uid for uid, v in _oldest_versions(extras).items() if uid in sampleable - set(uids)
                       and staleness(v, global_steps - 1, self.c3po.max_retention) != "any"}
        for uid in cannot_wait:  # evicted with the purged groups at the next poll
            self._purged[uid] = True
        self._purged_this_step += len(cannot_wait)
        self._purged_tokens_this_step += sum(tokens[uid] for uid in cannot_wait)
        self._append_timeline(global_steps, [(k, e) for k, e in extras.items() if _uid(k) in cannot_wait], True)
        return uids, extras

    def _put_token_lags(self, global_steps: int, batch: Any, extras: list[dict]) -> None:
        """Each response token's version lag travels with the batch (ring_ext.batch_fields.ROLLOUT_POLICY_LAG), so
        the loss can tell staleness apart from engine mismatch."""
        rows = []
        for key, tag, extra in zip(batch.keys, batch.tags, extras, strict=True):
            lags = token_lags(extra.get("c3po_segments", []), global_steps - 1)
            if len(lags) != int(tag.get("response_len", 0)):
                raise ValueError(f"C3PO++ trajectory {key}: segments hold {len(lags)} tokens, the response "
                                 f"{tag.get('response_len')}: versions would not line up with the tokens")
            rows.append({ROLLOUT_POLICY_LAG: torch.tensor(lags, dtype=torch.int64)})
        if rows:
            tq.kv_batch_put(keys=list(batch.keys), partition_id=batch.partition_id,
                            fields=list_of_dict_to_tensordict(rows))

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
            "c3po/purged_tokens": self._purged_tokens_this_step,  # decoded, then purged with their group: wasted
            "c3po/prompts_added": self._added_this_step,  # top-ups while decoding (each replaces a group)
            "c3po/version_lag/mean": sum(k * v for k, v in lag.items()) / lag_tokens,
            "c3po/version_lag/max": max(lag, default=0),
            "c3po/stale_token_fraction": sum(v for k, v in lag.items() if k > 0) / lag_tokens,
            "c3po/trainer_wait_s": wait_s,  # the trainer idles while the engine fills the budget
        }

    @staticmethod
    def _read_tokens(batch: Any) -> list[dict]:
        """Token ids and rollout log-probs of each trained request, for checking a run against its checkpoints."""
        fields = ["prompts", "responses", "rollout_log_probs"]
        data = tq.kv_batch_get(keys=list(batch.keys), partition_id=batch.partition_id, select_fields=fields)
        return [{"prompt_ids": data["prompts"][i].tolist(), "response_ids": data["responses"][i].tolist(),
                 "rollout_log_probs": data["rollout_log_probs"][i].tolist()} for i in range(len(batch.keys))]

    def _append_timeline(self, global_steps: int, rows: list[tuple[str, dict]], purged: bool,
                         tags: list[dict] | None = None, tokens: list[dict] | None = None) -> None:
        if not self.timeline_path or not rows:
            return
        os.makedirs(os.path.dirname(self.timeline_path) or ".", exist_ok=True)
        with open(self.timeline_path, "a") as f:
            for i, (key, extra) in enumerate(rows):
                dispatched = tags[i].get("global_steps") if tags else None  # the step its prompt was submitted in
                f.write(json.dumps({"step": global_steps, "key": key, "purged": purged, "dispatch_step": dispatched,
                                    "segments": extra.get("c3po_segments", []),
                                    "restored_tokens": extra.get("c3po_restored_tokens", 0),
                                    **(tokens[i] if tokens else {})}) + "\n")

"""C3PO++ on the rollout side: verl's resuming LLM client with one `ResumeTracker` per request.

Where it sits: verl's agent loop calls `generate()` per sample; a weight sync aborts every request in flight, and
this client resubmits prompt + tokens so far under the new weights, asking for the remaining budget only
(`rules.resume_budget`), recording the weight version of every segment (`extra_fields["c3po_segments"]`:
[version, tokens, start_s, end_s]) and purging a request carried more than sigma updates (`rules.after_cut`).
A purged sample's siblings stop at their next resume: a group is trained whole or not at all. A group is verl's uid
(`identity.py`), as in the trainer's pool: two groups of one prompt in flight never share counts, purges or partials.
Each finished request is reported to the budget gate (`gate.py`), which cuts the phase at the crossing completion.
Each request cut short is spooled (`partials.PartialSpool`) so a checkpoint can carry it across a restart.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

import numpy as np
from verl.utils import normalize_token_ids
from verl.workers.rollout.llm_server import FullyAsyncLLMServerClient, LLMServerClient
from verl.workers.rollout.replica import TokenOutput

from ring_ext_c3po.identity import is_validation, request_identity
from ring_ext_c3po.keep import SWITCHES, split_at_switches
from ring_ext_c3po.partials import Partial, PartialSpool, prompt_key
from ring_ext_c3po.resume import Next, ResumeTracker
from ring_ext_c3po.rules import C3POConfig

MODE = "c3po"
RESUME_WAIT_S = 0.05  # the engine parks resubmitted requests itself while the replicas sync weights
PURGE_MEMORY_S = 60.0  # siblings look for a purge within RESUME_WAIT_S of their cut; older marks are dropped


def spool_for(config: Any) -> PartialSpool:
    return PartialSpool(os.path.join(os.path.abspath(config.trainer.default_local_dir), "c3po_spool"))


class C3POLLMServerClient(FullyAsyncLLMServerClient):
    def __init__(self, *args: Any, gate: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gate = gate  # gate.BudgetGate actor handle; None: the trainer's poll alone cuts the phase
        self._c3po, self._spool = C3POConfig.from_trainer_config(self.config), spool_for(self.config)
        self._purged_at: dict[str, float] = {}  # group -> wall clock of the cut that purged one of its samples

    async def generate(self, request_id, *, prompt_ids, sampling_params: dict[str, Any], **kwargs: Any) -> TokenOutput:
        """`admission: completion` first: the request waits at the gate until its group may enter an engine, and
        however it ends hands its slot on after its finished report (so a crossing closes admission before the slot
        goes on; admission.py). Then `_generate`."""
        prompt_ids = normalize_token_ids(prompt_ids)
        pkey = prompt_key(prompt_ids)
        group = request_identity(pkey)[0]
        gated = self._gate is not None and self._c3po.admission == "completion" and not is_validation()
        admitted = not gated or await self._gate.admit.remote(group)
        try:
            return await self._generate(request_id, prompt_ids, pkey, sampling_params, admitted, **kwargs)
        finally:
            if gated and admitted:
                self._gate.leave.remote(group)

    async def _generate(self, request_id, prompt_ids: list[int], pkey: str, sampling_params: dict[str, Any],
                        admitted: bool, **kwargs: Any) -> TokenOutput:
        params = dict(sampling_params)  # rewritten per segment: never touch the caller's dict
        key = "max_new_tokens" if "max_new_tokens" in params else "max_tokens"
        limit = params.get(key) or self._configured_response_length()
        if limit is None:
            raise ValueError("C3PO++ needs a response budget: set actor_rollout_ref.rollout.response_length")
        limit, sigma = int(limit), self._c3po.max_retention
        group, session = request_identity(pkey)  # verl's uid and session id (the prompt key outside the agent loop)
        ident = (group, session, pkey)  # what the spool keys this request's partial by
        spool_id = uuid.uuid4().hex  # request ids repeat under rollout.full_determinism ("det-<priority>")
        tracker = ResumeTracker(limit, sigma)
        out = TokenOutput(token_ids=[], log_probs=[], num_preempted=0)
        saved = self._spool.claim(group, session, pkey)  # this request's partial carried across a restart
        if saved is not None:
            saved.check(limit, sigma)
            tracker = ResumeTracker.resumed(limit, sigma, saved.segments, saved.retention)
            out.token_ids, out.log_probs = list(saved.token_ids), list(saved.log_probs or [])
            if saved.routed_experts is not None:
                out.routed_experts = np.asarray(saved.routed_experts)
        restored, cached, written = tracker.tokens, None, 0
        # not admitted: the run ended while the request waited for admission; it never reaches an engine
        step, closed = (Next.RESUME, False) if admitted else (Next.PURGED, True)
        resubmitted = saved is not None  # a request carried across a restart is resubmitted with its tokens
        while not closed:
            params[key] = tracker.remaining
            start, seg_key = time.time(), f"{spool_id}:{len(tracker.segments)}"
            if self._gate is not None:  # in flight from now, also across a sync that keeps it (phase_stats.py)
                self._gate.began.remote(seg_key, start)
            try:
                seg = await LLMServerClient.generate(self, request_id=request_id,
                                                     prompt_ids=prompt_ids + out.token_ids, sampling_params=params,
                                                     **kwargs)
            except BaseException:
                if self._gate is not None:  # no longer in flight, whatever stopped it
                    self._gate.segment.remote(start, time.time(), False, False, 0, seg_key)
                raise
            new = list(seg.token_ids)
            held = len(out.token_ids)  # what the request was (re)submitted with beyond its prompt
            out.token_ids.extend(new)
            if seg.log_probs is not None:
                out.log_probs.extend(seg.log_probs)
            if seg.routed_experts is not None and new:  # keep earlier routing, append the new tokens' routing
                tail = seg.routed_experts[-len(new):]
                out.routed_experts = tail if out.routed_experts is None else np.concatenate([out.routed_experts, tail])
            out.num_preempted += seg.num_preempted or 0
            out.stop_reason = seg.stop_reason
            cached = seg.extra_fields.get("num_cached_tokens") if cached is None else cached
            end = time.time()
            # carry: keep -- the engine kept this request across syncs: a piece per version (keep.py)
            pieces = split_at_switches(len(new), seg.extra_fields.get("global_steps"), seg.extra_fields.get(SWITCHES),
                                       start, end)
            for version, tokens, a, b in pieces[:-1]:
                step = tracker.record(version, tokens, "abort", a, b)  # a sync it was kept across counts as a cut
                if step is not Next.RESUME:
                    del out.token_ids[tracker.tokens:], out.log_probs[tracker.tokens:]  # past the bound: dropped
                    break
            else:
                step = tracker.record(pieces[-1][0], pieces[-1][1], seg.stop_reason, pieces[-1][2], end)
            if self._gate is not None:  # where the phase's time goes (phase_stats.py); a resubmission re-prefills
                self._gate.segment.remote(start, end, not resubmitted, step is Next.FINISHED,
                                          len(prompt_ids) + held if resubmitted and held else 0, seg_key)
            resubmitted = True
            if step is Next.PURGED:
                self._mark_purged(group)
            if step is not Next.RESUME:
                break
            await asyncio.sleep(RESUME_WAIT_S)
            if self._purged_at.get(group, 0.0) >= start:  # a sibling cut at the same abort was purged
                step = tracker.outcome = Next.PURGED
                break
            if self._gate is not None and await self._gate.is_closed.remote():  # the run ended: nothing trains it
                step, closed = Next.PURGED, True
                break
            if tracker.tokens:  # append-only: what was decoded since the last cut
                written = await asyncio.to_thread(self._spool.append, spool_id, self._partial(ident, out, tracker),
                                                  written)
        await asyncio.to_thread(self._spool.drop, spool_id)
        versions = [s.version for s in tracker.segments]
        if self._gate is not None and not closed:  # fire and forget: the gate cuts when this crosses the budget
            if step is Next.FINISHED:  # decode time only of a request never cut (a cut one's spans the training)
                one = tracker.segments[0] if len(tracker.segments) == 1 else None
                self._gate.finished.remote(group, len(out.token_ids),
                                           (min(versions), max(versions)) if versions else None,
                                           one.end_s - one.start_s if one is not None else None)
            else:
                self._gate.purged.remote(group)
        out.extra_fields.update(
            global_steps=versions[-1] if versions else None, min_global_steps=min(versions, default=None),
            max_global_steps=max(versions, default=None), num_cached_tokens=cached,
            c3po_segments=[s.to_list() for s in tracker.segments], c3po_retention=tracker.retention,
            c3po_purged=step is Next.PURGED, c3po_restored_tokens=restored)
        if step is Next.FINISHED and tracker.remaining == 0:
            out.stop_reason = "length"
        return out

    def _mark_purged(self, group: str) -> None:
        now = time.time()
        self._purged_at = {k: t for k, t in self._purged_at.items() if now - t < PURGE_MEMORY_S}
        self._purged_at[group] = now

    @staticmethod
    def _partial(identity: tuple[str, str | None, str], out: TokenOutput, tracker: ResumeTracker) -> Partial:
        log_probs = [float(x) for x in out.log_probs] if len(out.log_probs) == len(out.token_ids) else None
        routed = None if out.routed_experts is None else np.asarray(out.routed_experts).tolist()
        routed = routed if routed is not None and len(routed) == len(out.token_ids) else None  # misaligned: none
        return Partial(*identity, [int(t) for t in out.token_ids], log_probs,
                       [s.to_list() for s in tracker.segments], tracker.retention, routed)


def skip_scoring_purged(original: Any) -> Any:
    """verl's agent loop scores every finished sample before it reaches TransferQueue; a purged sample is evicted
    with its group unread, so it gets reward 0 without the reward worker's call (a reward model's forward, a sandbox
    run). Wraps `verl.experimental.agent_loop.agent_loop.AgentLoopWorker._compute_score` (the plugin's patch)."""

    async def _compute_score(self: Any, outputs: list[Any], kwargs: dict) -> None:
        final = outputs[-1]
        if final.extra_fields.get("c3po_purged"):
            final.reward_score = 0.0
            final.extra_fields.setdefault("reward_extra_info", {})
            return
        await original(self, outputs, kwargs)

    return _compute_score


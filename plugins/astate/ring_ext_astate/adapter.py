"""verl's end of the in-place sync: `ServerAdapter.update_weights` writes straight into its vLLM worker's parameters.

verl 0.9.1 hands every weight push to the rollout's `ServerAdapter.update_weights(weights)`: in the colocated
modes (sync, colocate_async, c3po) the trainer rank calls it with its model's tensors, in separate_async the
checkpoint-engine worker does with what it received. verl's own body copies each tensor into a bucket and has the
vLLM worker `load_weights` from it. When the vLLM engine runs the ``astate`` weight-transfer backend, the patched
method instead drives vLLM's weight-transfer session on its worker and writes this rank's slices into the worker's
parameter arena itself (`InPlaceSender`): start (the parameters have not moved) -> write -> update (the worker checks
coverage, version, digests) -> finish (commit), then verl's own tail (prefix cache reset, step stamp). A failed
attempt is retried whole after a backoff; the last failure stops the run naming tensor and rank, with the version
unchanged and the prefix cache and step stamp untouched.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from ring_ext.run_record import record_sync
from ring_ext_astate.control import descriptor_path, wait_for_file
from ring_ext_astate.errors import SyncError
from ring_ext_astate.inplace import InPlaceSender, WriteStats
from ring_ext_astate.options import AStateOptions
from ring_ext_astate.plan import Plan

logger = logging.getLogger("ring_ext")
BACKEND = "astate"


def in_place(rollout: Any) -> bool:
    """The rollout config asks vLLM for the astate weight-transfer backend."""
    wtc = (rollout.get("engine_kwargs", {}) or {}).get("vllm", {}) or {}
    return ((wtc.get("weight_transfer_config") or {}) or {}).get("backend") == BACKEND


def run_dir(job_id: str, replica_rank: int) -> Path:
    return Path(tempfile.gettempdir()) / f"ring-ext-astate-{os.getuid()}" / f"{job_id}-replica-{replica_rank}"


class _State:
    def __init__(self, adapter: Any) -> None:
        import ray

        self.options = AStateOptions.from_rollout_config(adapter.config)
        self.dir = run_dir(ray.get_runtime_context().get_job_id(), adapter.replica_rank)
        self.rank = adapter.rollout_rank
        self.leader = adapter._has_server
        self.sender: InPlaceSender | None = None
        self.version = 0
        _STATES.append(self)


# the in-place states of this process's server adapters: in separate_async verl's checkpoint-engine worker holds one
# adapter and one checkpoint engine in the same process, and the engine reads its worker's target from here
_STATES: list[_State] = []


@dataclass(frozen=True)
class DirectTarget:
    """A rollout worker the trainer ranks can write themselves (one host, its in-place engine started)."""

    descriptor: str
    version: int  # the version the next sync commits
    verify: bool  # whether that sync is verified (the worker's options decide)
    host: str
    plan: Plan | None = None  # across hosts: the trainer ranks cut the worker's slices from it
    ignored: frozenset[str] = frozenset()  # names the worker's loaders read but write nowhere (its first sync's)


def direct_target(host: str, with_plan: bool = False) -> DirectTarget | None:
    """This process's rollout worker as a direct target, once its first sync set the in-place engine up."""
    if len(_STATES) != 1 or _STATES[0].sender is None:
        return None
    st = _STATES[0]
    welcome = st.sender.welcome
    return DirectTarget(str(descriptor_path(st.dir, st.rank)), st.version + 1, st.options.verified(st.version + 1, 0),
                        host, welcome.plan if with_plan else None, welcome.ignored if with_plan else frozenset())


def started_marker(descriptor: str | Path, version: int, attempt: int = 0) -> Path:
    """Touched by the replica's leader once vLLM's session for `version` is open: writes may land."""
    return Path(descriptor).parent / f"started-{version}-{attempt}"


class WrittenInPlace:
    """What the `astate` checkpoint engine hands the server adapter when the trainer ranks wrote the worker's
    parameters themselves: nothing to iterate (verl's own update_weights would apply an empty update), only the
    sync to commit."""

    def __init__(self, version: int, senders: int, verify: bool,
                 receive: Callable[[InPlaceSender, int, bool], Awaitable[WriteStats]] | None = None) -> None:
        self.version, self.senders, self.verify = version, senders, verify
        # across hosts: the bytes still have to arrive; called once vLLM's session is open, it writes them into the
        # worker's parameters (this process's mapping of them) and returns what to report
        self.receive = receive

    def __aiter__(self) -> "WrittenInPlace":
        return self

    async def __anext__(self) -> Any:
        raise StopAsyncIteration


async def _wait_for(path: Path, timeout_s: float, what: str) -> None:
    await asyncio.to_thread(wait_for_file, path, timeout_s, what)  # the event loop keeps serving meanwhile


async def update_weights_in_place(adapter: Any, weights: Any, global_steps: int | None = None) -> dict:
    st: _State = adapter.__dict__.get("_astate") or adapter.__dict__.setdefault("_astate", _State(adapter))
    o = st.options
    if st.sender is None:
        if st.leader:
            await adapter._execute_method("init_weight_transfer_engine", kwargs={"init_info": {
                "run_dir": str(st.dir), "shadow": o.shadow}})
        await _wait_for(descriptor_path(st.dir, st.rank), o.timeout_s, f"descriptor of rollout worker {st.rank}")
        st.sender = InPlaceSender(str(descriptor_path(st.dir, st.rank)), o.timeout_s)
        st.version = st.sender.welcome.version
    if isinstance(weights, WrittenInPlace):  # separate_async, one host: the trainer ranks wrote, we commit
        if weights.version != st.version + 1:
            raise SyncError(f"astate: the trainer ranks wrote sync {weights.version}, rollout worker {st.rank} "
                            f"expects {st.version + 1}")
        senders, items, retries = weights.senders, None, 0  # the writes are theirs: a retry would need them again
        direct_verify = weights.verify  # what the trainer ranks were told: the same options decide it here
        how = "this process, from the trainer ranks' slices across hosts" if weights.receive else \
            f"{senders} trainer rank(s) directly"
    elif hasattr(weights, "__aiter__"):  # separate_async staged: what the checkpoint engine received
        senders, items, retries, how = 1, [item async for item in weights], o.retries, "this process"
    else:
        items = list(weights) if o.retries else weights  # a retry writes the same tensors again
        senders, retries, how = 1, o.retries, "this process"
    for attempt in range(retries + 1):
        version, verify = st.version + 1, o.verified(st.version + 1, attempt)
        if items is None:
            verify = direct_verify
        try:
            t0 = time.perf_counter()
            started = started_marker(descriptor_path(st.dir, st.rank), version, attempt)
            if st.leader:
                await adapter._execute_method("start_weight_update")
                started.touch(mode=0o600)
            await _wait_for(started, o.timeout_s, f"start of sync {version}")
            if items is None and weights.receive is not None:  # across hosts: the bytes arrive now, into place
                stats = await weights.receive(st.sender, version, verify)
                st.sender.report(version, st.rank, stats)
            elif items is None:  # committed only if the trainer ranks' reports cover every planned byte once
                stats = WriteStats(bytes=st.sender.welcome.plan.nbytes, verified=verify)
            else:
                stats = await asyncio.to_thread(st.sender.write, items, version, verify)
                st.sender.report(version, st.rank, stats)
            if st.leader:
                info = {"version": version, "senders": senders, "verify": verify, "timeout_s": o.timeout_s}
                await adapter._execute_method("update_weights", kwargs={"update_info": info})
                await adapter._execute_method("finish_weight_update")
                started.unlink()  # every worker's report arrived, so every sender saw it
            seconds = time.perf_counter() - t0
            break
        except Exception as e:
            if st.leader:  # close vLLM's session: its update_weights ends it on an error (the version stays)
                try:
                    await adapter._execute_method("update_weights", kwargs={"update_info": {
                        "version": version, "abort": True}})
                except Exception:
                    pass
            if attempt == retries:
                raise SyncError(f"astate: weight sync {version} into rollout worker {st.rank} failed "
                                f"{attempt + 1} time(s); the rollout keeps version {st.version}. "
                                f"Last error: {e}") from e
            logger.error("ring-ext astate: sync %d attempt %d failed (%s); retrying whole in %.1fs",
                         version, attempt + 1, e, o.backoff_s * 2**attempt)
            await asyncio.sleep(o.backoff_s * 2**attempt)
    st.version = version
    if st.leader:
        await adapter.server_handle.clear_kv_cache.remote()  # resets the prefix cache: no prefix of old weights
        if global_steps is not None:
            await adapter.server_handle.set_global_steps.remote(global_steps)
    metrics = {"astate/bytes_per_worker": stats.bytes, "astate/seconds": seconds, "astate/version": version,
               "astate/gb_per_s": stats.bytes / max(seconds, 1e-9) / 1e9, "astate/verified": float(verify),
               "astate/attempts": attempt + 1, "astate/senders": senders}
    record_sync(adapter, metrics, global_steps)  # the run's summary (verl's colocated trainers drop these metrics)
    logger.warning("ring-ext astate: sync %d into rollout worker %d in place: %.1f MiB in %.3fs (%.2f GB/s, "
                   "verified=%s, attempts=%d, written by %s)", version, st.rank, stats.bytes / 2**20, seconds,
                   metrics["astate/gb_per_s"], verify, attempt + 1, how)
    return metrics


def in_place_update_weights(original: Any) -> Any:
    """Wraps verl's `ServerAdapter.update_weights` (vllm_rollout module): through astate where configured."""

    async def update_weights(self, weights, global_steps: int = None, wire_format: str = "named_tensors", **kw):
        if wire_format != "named_tensors" or not in_place(self.config) or kw.get("peft_config") is not None:
            return await original(self, weights, global_steps=global_steps, wire_format=wire_format, **kw)
        return await update_weights_in_place(self, weights, global_steps)

    return update_weights

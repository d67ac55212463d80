"""Which group and sample a rollout request belongs to: verl's uid and session id, carried to the client.

Where it sits: the gate counts a group's tokens (`rules.GroupBudget`), the client's purge marks stop a purged
sample's siblings, and the spool hands a restarted request its own partial (`partials.py`); all three key a group
the way the trainer's pool does, by verl's uid. The client's `generate()` is not given the uid, but verl's v1 worker
runs each sample as `AgentLoopWorker._run_agent_loop(..., session_id=i, **prompt)` (agent_loop_tq `_run_prompt`;
the prompt's fields hold `uid`) in its own asyncio task, and the agent loop awaits `generate()` inside it. So a
wrapper of `_run_agent_loop` (the plugin's patch) sets a context variable that `generate()` reads in the same task.
A client called outside verl's agent loop has no uid: it falls back to the prompt's hash (two groups of one prompt
in flight then share a key), with a warning once per process.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any

logger = logging.getLogger(__name__)

# (uid, session id) of the sample whose agent loop runs in this asyncio task; None outside verl's agent loop
_REQUEST: ContextVar[tuple[str, str | None] | None] = ContextVar("ring_ext_c3po_request", default=None)
# the sample is a validation one (verl's trajectory["validate"]): no budget, no admission wait
_VALIDATE: ContextVar[bool] = ContextVar("ring_ext_c3po_validate", default=False)
_warned = False


def request_identity(prompt_key: str) -> tuple[str, str | None]:
    """(group, session) of the request being generated: verl's (uid, session id), else (prompt key, None)."""
    global _warned
    current = _REQUEST.get()
    if current is not None:
        return current
    if not _warned:
        _warned = True
        logger.warning("C3PO++ client called outside verl's agent loop (no uid in context): groups are keyed by "
                       "their prompt, so two groups of one prompt in flight share budget counts, purges and "
                       "partials")
    return prompt_key, None


def is_validation() -> bool:
    """The request being generated is a validation sample's (False outside verl's agent loop)."""
    return _VALIDATE.get()


_original_run: Any = None  # verl's AgentLoopWorker._run_agent_loop in this process, set by the patch


def identify_requests(original: Any) -> Any:
    """The plugin's patch of `verl.experimental.agent_loop.agent_loop.AgentLoopWorker._run_agent_loop`: the sample's
    uid and session id are visible to the client's `generate()` while its agent loop runs.

    The wrapper is a module-level function and finds verl's original through a module global, never a closure:
    Ray pickles verl's worker class by value to start its actors, and a function it reaches through a closure is
    pickled by value too, with a copy of verl's module globals, so the worker registered its agent loops
    (`_agent_loop_registry`) in one dict and the original looked them up in another ("Agent loop ... not
    registered" for every loop outside verl's own). A module's function travels by name; in the actor's process the
    same patch has set `_original_run` to that process's original."""
    global _original_run
    _original_run = original
    return run_agent_loop_identified


async def run_agent_loop_identified(self: Any, *args: Any, **kwargs: Any) -> Any:
    uid, session = kwargs.get("uid"), kwargs.get("session_id")
    token = _REQUEST.set(None if uid is None else (str(uid), None if session is None else str(session)))
    trajectory = kwargs.get("trajectory", args[1] if len(args) > 1 else None)  # (sampling_params, trajectory, ...)
    validate = _VALIDATE.set(bool((trajectory or {}).get("validate", False)))
    try:
        return await _original_run(self, *args, **kwargs)
    finally:
        _REQUEST.reset(token)
        _VALIDATE.reset(validate)

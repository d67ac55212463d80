"""The same prompt twice in flight: two groups of one prompt never merge their budget counts, purge each other's
samples, or take each other's partials after a restart.

Real datasets repeat prompts and verl's dataloader cycles past an epoch, so two groups of one prompt (two uids) can
decode at once. Each test runs verl's own v1 worker code: `AgentLoopWorkerTQ._run_prompt` starts a prompt's n
sessions through `AgentLoopWorker._run_agent_loop` (patched by the plugin on `import verl`), which instantiates an
agent loop that calls the C3PO++ client; the client runs verl's `LLMServerClient.generate`. What cannot exist in a
unit test is stood in for: the rollout engine and its load balancer (a scripted engine behind Ray-handle-shaped
objects), TransferQueue's status writes and output store (recorded), and the gate actor's Ray transport (the real
`BudgetGate` object, called on the test's event loop).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import defaultdict
from typing import Any

import pytest

pytest.importorskip("verl")
import verl  # noqa: E402,F401  (loads the plugin, which patches the agent loop on import)
from omegaconf import OmegaConf  # noqa: E402
from verl.experimental.agent_loop.agent_loop import AgentLoopWorker, register  # noqa: E402
from verl.trainer.ppo.v1 import agent_loop_tq  # noqa: E402
from verl.workers.rollout.replica import TokenOutput  # noqa: E402

from ring_ext.patching import PATCHED  # noqa: E402
from ring_ext_c3po import identity  # noqa: E402
from ring_ext_c3po.client import C3POLLMServerClient, spool_for  # noqa: E402
from ring_ext_c3po.gate import BudgetGate  # noqa: E402
from ring_ext_c3po.partials import prompt_key  # noqa: E402

PROMPT, G = [5, 6, 7], 2  # one prompt, two samples per group


class Remote:
    """A Ray actor handle's `handle.method.remote(...)` over a local object, on the running event loop: awaitable,
    and run even when not awaited (fire and forget, as the client calls the gate). Records every call."""

    def __init__(self, obj: Any) -> None:
        self.obj, self.calls = obj, []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.obj, name)
        handle = self

        class _Method:
            @staticmethod
            def remote(*args: Any, **kwargs: Any) -> asyncio.Future:
                handle.calls.append((name, args))
                result = method(*args, **kwargs)
                if inspect.isawaitable(result):
                    return asyncio.ensure_future(result)
                future = asyncio.get_running_loop().create_future()
                future.set_result(result)
                return future

        return _Method


class Engine:
    """The rollout server: each call of a request (verl's request id, passed through under full_determinism) takes
    the next segment the test gives it: (tokens, stop reason, weight version). `hold` first calls until `expected`
    requests have all arrived, so that they are all in flight when the first one returns."""

    def __init__(self, expected: int = 0) -> None:
        self.segments: dict[str, asyncio.Queue] = defaultdict(asyncio.Queue)
        self.calls: dict[str, int] = defaultdict(int)
        self.expected, self.all_in = expected, asyncio.Event()
        self.aborts = 0

    def give(self, request_id: str, tokens: int, stop: str = "stop", version: int = 0) -> None:
        self.segments[request_id].put_nowait((tokens, stop, version))

    async def generate(self, request_id: str, prompt_ids: list[int], sampling_params: dict, **_: Any) -> TokenOutput:
        self.calls[request_id] += 1
        if sum(1 for n in self.calls.values() if n) == self.expected:
            self.all_in.set()
        if self.expected:
            await self.all_in.wait()
        tokens, stop, version = await self.segments[request_id].get()
        assert tokens <= sampling_params["max_tokens"]
        start = len(prompt_ids) - len(PROMPT)  # tokens this request already holds
        return TokenOutput(token_ids=list(range(1000 + start, 1000 + start + tokens)), log_probs=[-0.5] * tokens,
                           stop_reason=stop, extra_fields={"global_steps": version})

    def abort_all_requests(self) -> None:
        self.aborts += 1


class Balancer:
    def __init__(self, engine: Engine) -> None:
        self.engine = Remote(engine)

    def require_acquire_fields(self) -> list[str]:
        return []

    def require_release_fields(self) -> list[str]:
        return []

    def acquire_server(self, request_id: str) -> tuple[str, Any]:
        return "server-0", self.engine

    def release_server(self, server_id: str, **_: Any) -> None:
        pass


@register("c3po_same_prompt_test")
class OneTurnLoop:
    """An agent loop of one generate() call, its request id naming the sample so the engine can script it."""

    def __init__(self, server_manager: Any, **_: Any) -> None:
        self.client = server_manager

    async def run(self, sampling_params: dict, *, uid: str, session_id: int, raw_prompt: Any, **_: Any) -> Any:
        return await self.client.generate(f"{uid}-{session_id}", prompt_ids=list(PROMPT),
                                          sampling_params=sampling_params)


class Worker(AgentLoopWorker):
    """verl's v1 worker: its `_run_prompt` (unchanged) runs the prompt's sessions through verl's `_run_agent_loop`
    (with the plugin's patch); TransferQueue, which cannot run here, is the one thing replaced: the outputs are kept
    by (uid, session) instead of being put into it."""

    _run_prompt = agent_loop_tq.AgentLoopWorkerTQ.__ray_metadata__.modified_class._run_prompt

    async def _agent_loop_postprocess(self, output: Any, validate: bool, **kwargs: Any) -> None:
        self.outputs[(kwargs["uid"], kwargs["session_id"])] = output


def _config(tmp_path, sigma: int, budget: int) -> Any:
    return OmegaConf.create({
        "trainer": {"default_local_dir": str(tmp_path), "v1": {"c3po": {"token_budget": budget,
                                                                       "max_retention": sigma}}},
        "actor_rollout_ref": {"rollout": {"n": G, "response_length": 16, "full_determinism": True, "name": "vllm"}},
        "data": {}})


def _worker(config: Any, engine: Engine, budget: int, sigma: int) -> tuple[Worker, BudgetGate, Remote]:
    gate_obj = BudgetGate(G, budget, [Remote(engine)], sigma)
    gate = Remote(gate_obj)
    worker = object.__new__(Worker)  # verl's __init__ starts servers and tokenizers; _run_agent_loop needs these
    worker.config, worker.outputs = config, {}
    worker.llm_client = C3POLLMServerClient(config, load_balancer_handle=Remote(Balancer(engine)), gate=gate)
    worker.tokenizer = worker.processor = worker.hf_model_type = worker.dataset_cls = None
    worker.tools = []
    return worker, gate_obj, gate


def _prompt(uid: str) -> dict:
    return {"uid": uid, "raw_prompt": [{"role": "user", "content": "the same question"}],
            "agent_name": "c3po_same_prompt_test"}


def _run(worker: Worker, uid: str) -> asyncio.Task:
    trajectory = {"step": 1, "sample_index": 0, "rollout_n": 0, "validate": False}
    return asyncio.create_task(worker._run_prompt(_prompt(uid), {"max_tokens": 16}, trajectory))


async def _until(condition, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


@pytest.fixture(autouse=True)
def _no_transfer_queue(monkeypatch):
    statuses = []

    async def kv_put(key: str, partition_id: str, tag: dict) -> None:
        statuses.append((key, tag["status"]))

    monkeypatch.setattr(agent_loop_tq.tq, "async_kv_put", kv_put)
    return statuses


def test_the_plugin_wraps_verl_s_agent_loop_runner_and_ray_can_ship_it():
    """Ray serialises verl's worker class, patched methods included, by value to start its actors: the wrapper must
    pickle (a context variable cannot)."""
    import ray.cloudpickle

    from verl.experimental.agent_loop import agent_loop

    assert getattr(AgentLoopWorker._run_agent_loop, PATCHED, False)
    assert inspect.unwrap(AgentLoopWorker._run_agent_loop).__qualname__ == "AgentLoopWorker._run_agent_loop"
    shipped = ray.cloudpickle.loads(ray.cloudpickle.dumps(agent_loop_tq.AgentLoopWorkerTQ.__ray_metadata__.modified_class))
    # the wrapper travels by name, so verl's original runs with verl's module globals, where the worker registers
    # its agent loops (pickled by value through a closure, it looked them up in a copy: custom loops "not registered")
    chain, fn = [], shipped._run_agent_loop  # Ray's tracing wrapper, then ring-ext's, then verl's
    while fn is not None:
        chain.append(fn)
        fn = getattr(fn, "__wrapped__", None)
    assert AgentLoopWorker._run_agent_loop in chain  # ring-ext's wrapper came through by name, not copied
    assert chain[-1].__globals__ is agent_loop.__dict__


def test_two_groups_of_one_prompt_count_towards_the_budget_apart(tmp_path, _no_transfer_queue):
    """Phi = 8, G = 2. One sample of each group finishes (5 tokens each): neither group is whole, C stays 0 and the
    gate does not cut (keyed by prompt they made one "group" of 10 tokens and cut the phase). Group A's second
    sample finishes with 3: A counts 8 and crosses Phi; then B counts its own 6."""

    async def scenario() -> None:
        engine = Engine()
        worker, gate, _ = _worker(_config(tmp_path, 1, 8), engine, 8, 1)
        tasks = [_run(worker, "uid-a"), _run(worker, "uid-b")]
        engine.give("uid-a-0", 5)
        engine.give("uid-b-0", 5)
        await _until(lambda: ("uid-a", 0) in worker.outputs and ("uid-b", 0) in worker.outputs)
        await asyncio.sleep(0.05)  # the gate's calls land
        assert gate.budget.tokens == 0 and gate.cut_at is None and engine.aborts == 0
        engine.give("uid-a-1", 3)
        await _until(lambda: gate.cut_at is not None)
        assert gate.budget.tokens == 8 and engine.aborts == 1  # A's last sample crossed Phi
        engine.give("uid-b-1", 1)
        await asyncio.gather(*tasks)
        await _until(lambda: gate.budget.tokens == 14)
        assert engine.aborts == 1  # the crossing fires once per phase

    asyncio.run(scenario())
    assert sorted(_no_transfer_queue) == [("uid-a", "finished"), ("uid-a", "running"),
                                          ("uid-b", "finished"), ("uid-b", "running")]


def test_a_purge_in_one_group_leaves_the_other_group_of_the_prompt_decoding(tmp_path):
    """sigma = 0. All four samples in flight, the abort cuts them: A's session 0 held 3 tokens and is purged, the
    others held none and resume. A's session 1 stops with its group; B's two samples decode on and finish, and the
    gate counts B whole (keyed by prompt, A's purge stopped B too and nothing counted)."""

    async def scenario() -> None:
        engine = Engine(expected=4)
        worker, gate, handle = _worker(_config(tmp_path, 0, 100), engine, 100, 0)
        tasks = [_run(worker, "uid-a"), _run(worker, "uid-b")]
        engine.give("uid-a-0", 3, "aborted")
        for request in ("uid-a-1", "uid-b-0", "uid-b-1"):
            engine.give(request, 0, "aborted")
        engine.give("uid-b-0", 4, version=1)
        engine.give("uid-b-1", 2, version=1)
        await asyncio.gather(*tasks)
        await _until(lambda: gate.budget.tokens == 6)
        purged = {key: out.extra_fields["c3po_purged"] for key, out in worker.outputs.items()}
        assert purged == {("uid-a", 0): True, ("uid-a", 1): True, ("uid-b", 0): False, ("uid-b", 1): False}
        assert [len(worker.outputs["uid-b", s].token_ids) for s in (0, 1)] == [4, 2]
        assert sorted(args[0] for name, args in handle.calls if name == "purged") == ["uid-a", "uid-a"]
        assert sorted(args[0] for name, args in handle.calls if name == "finished") == ["uid-b", "uid-b"]

    asyncio.run(scenario())


def test_after_a_restart_each_request_resumes_its_own_partial(tmp_path):
    """Groups A and B of one prompt are cut mid-decode: A's session 0 holds 5 tokens, B's session 1 holds 2, the
    others none. The trainer's checkpoint snapshots the spool and the process stops. On resume verl re-issues both
    prompts under their uids (B first here); each request continues from its own tokens (keyed by prompt, B's
    session 0 took A's 5 tokens, and A's session 0 got B's 2 or nothing)."""
    config = _config(tmp_path, 1, 100)

    async def first_process() -> list[dict]:
        engine = Engine(expected=4)
        worker, _, _ = _worker(config, engine, 100, 1)
        tasks = [_run(worker, "uid-a"), _run(worker, "uid-b")]
        for request, tokens in (("uid-a-0", 5), ("uid-a-1", 0), ("uid-b-0", 0), ("uid-b-1", 2)):
            engine.give(request, tokens, "aborted")
        # each resubmits after spooling what it holds, and waits in the engine for generation to resume
        await _until(lambda: len(engine.calls) == 4 and all(n == 2 for n in engine.calls.values()))
        snapshot = spool_for(config).snapshot()  # the trainer's checkpoint
        for task in tasks:  # the process stops
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return snapshot

    snapshot = asyncio.run(first_process())
    assert sorted((p["group"], p["session"], len(p["token_ids"])) for p in snapshot) == [
        ("uid-a", "0", 5), ("uid-b", "1", 2)]
    assert spool_for(config).stage(snapshot) == 2  # the trainer's _load_checkpoint

    async def resumed_process() -> dict:
        engine = Engine()
        worker, _, _ = _worker(config, engine, 100, 1)
        for request in ("uid-a-0", "uid-a-1", "uid-b-0", "uid-b-1"):
            engine.give(request, 1, version=3)
        await _run(worker, "uid-b")  # B's sessions claim first: neither may take A's partial
        await _run(worker, "uid-a")
        return worker.outputs

    outputs = asyncio.run(resumed_process())
    restored = {key: out.extra_fields["c3po_restored_tokens"] for key, out in outputs.items()}
    assert restored == {("uid-a", 0): 5, ("uid-a", 1): 0, ("uid-b", 0): 0, ("uid-b", 1): 2}
    assert outputs["uid-a", 0].token_ids == [1000, 1001, 1002, 1003, 1004, 1005]  # its own 5, then one more
    assert [s[0] for s in outputs["uid-a", 0].extra_fields["c3po_segments"]] == [0, 3]
    assert spool_for(config).unclaimed() == 0


def test_outside_verl_s_agent_loop_the_client_keys_by_prompt_and_warns_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(identity, "_warned", False)
    config = _config(tmp_path, 1, 100)

    async def scenario() -> list:
        engine = Engine()
        worker, _, handle = _worker(config, engine, 100, 1)
        for request in ("r0", "r1"):
            engine.give(request, 2)
        with caplog.at_level(logging.WARNING, logger="ring_ext_c3po.identity"):
            for request in ("r0", "r1"):
                await worker.llm_client.generate(request, prompt_ids=list(PROMPT), sampling_params={})
        await asyncio.sleep(0.05)
        return handle.calls

    calls = asyncio.run(scenario())
    assert [args[0] for name, args in calls if name == "finished"] == [prompt_key(PROMPT)] * 2
    assert caplog.text.count("called outside verl's agent loop") == 1

"""The GPU writer's copy (ring_ext_astate.pull) on CPU: the worker pulls a trainer process's exported weights into
its own parameters, re-armed after a wake-up and after the trainer's buffers move.

Stand-ins, for the GPU path they name: shared memory for CUDA IPC (`reduce_tensor` exports either), a
torch.multiprocessing queue for the call that carries the `Export` to the worker, `Puller.woke_up` for vLLM's
`wake_up` after a level-2 sleep (benchmarks/gpu_ipc_check.py measures the page replacement on a GPU). The trainer is
a real second process; the plan and the model are the in-place core's (inplace_worker.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as tmp
from inplace_worker import FusedModel, fused_plan, fused_weights

from ring_ext_astate.arena import ParamArena
from ring_ext_astate.errors import SyncError
from ring_ext_astate.inplace import check_reports
from ring_ext_astate.pull import Puller, export


def _trainer(commands, exports) -> None:
    """A trainer rank: exports its weights; `update` rewrites them in place (same buffers, same generation),
    `move` reallocates them (an offload and reload: a new generation)."""
    weights, generation = fused_weights(0), 0
    exports.put(export(0, generation, weights.items()))
    while (cmd := commands.get()) != "stop":
        kind, seed = cmd
        if kind == "update":
            for name, t in fused_weights(seed).items():
                weights[name].copy_(t)
            exports.put(None)
        else:
            weights, generation = fused_weights(seed), generation + 1
            exports.put(export(0, generation, weights.items()))


@pytest.fixture
def setup():
    ctx = tmp.get_context("spawn")
    commands, exports = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_trainer, args=(commands, exports), daemon=True)
    proc.start()
    model = FusedModel()
    arena, layout = ParamArena.adopt(model.named_parameters())
    plan = fused_plan(arena, layout)
    puller = Puller(plan, model.named_parameters, ignored=frozenset({"tied"}))
    yield {"commands": commands, "exports": exports, "model": model, "plan": plan, "puller": puller, "arena": arena}
    commands.put("stop")
    proc.join(timeout=30)
    arena.unlink()


def _expect(model: FusedModel, seed: int) -> None:
    w = {k: v.to(torch.bfloat16) for k, v in fused_weights(seed).items()}
    assert torch.equal(model.qk[:4], w["q"]) and torch.equal(model.qk[4:], w["k"][:2])
    assert torch.equal(model.norm, w["norm"])


def test_the_worker_pulls_each_sync_through_one_mapping_and_refuses_stale_ones(setup: dict) -> None:
    s, puller = setup, setup["puller"]
    exp = s["exports"].get(timeout=60)
    puller.arm(exp)
    report = puller.pull(0, exp.generation, 1, verify=True)
    assert check_reports(s["plan"], [report], 1, s["arena"].bytes, False, 0) == s["plan"].nbytes
    _expect(s["model"], 0)

    s["commands"].put(("update", 1))  # the trainer's next weights, in the same buffers: no re-arm
    assert s["exports"].get(timeout=60) is None
    check_reports(s["plan"], [puller.pull(0, exp.generation, 2)], 2, s["arena"].bytes, False, 0)
    _expect(s["model"], 1)

    puller.woke_up()  # the worker's parameters were discarded and re-created
    with pytest.raises(SyncError, match="predates wake-up 1"):
        puller.pull(0, exp.generation, 3)
    puller.arm(exp)
    check_reports(s["plan"], [puller.pull(0, exp.generation, 3)], 3, s["arena"].bytes, False, 0)

    s["commands"].put(("move", 2))  # the trainer's buffers moved: generation 1
    moved = s["exports"].get(timeout=60)
    assert moved.generation == exp.generation + 1
    with pytest.raises(SyncError, match="generation 1, the mapping of generation 0: they moved, re-arm"):
        puller.pull(0, moved.generation, 4)
    _expect(s["model"], 1)  # the refused pull wrote nothing
    puller.arm(moved)
    check_reports(s["plan"], [puller.pull(0, moved.generation, 4, verify=True)], 4, s["arena"].bytes, False, 0)
    _expect(s["model"], 2)


def test_a_partial_or_unplanned_export_is_refused(setup: dict) -> None:
    s, puller = setup, setup["puller"]
    exp = s["exports"].get(timeout=60)
    partial = type(exp)(exp.rank, exp.generation, tuple(x for x in exp.tensors if x[0] != "k"))
    puller.arm(partial)
    with pytest.raises(SyncError, match=r"wrote 40 of 56 planned bytes"):
        check_reports(s["plan"], [puller.pull(0, 0, 1)], 1, s["arena"].bytes, False, 0)
    with pytest.raises(SyncError, match=r"exports \['v'\], which no planned destination takes"):
        puller.arm(type(exp)(1, 0, (*exp.tensors, ("v", exp.tensors[0][1]))))
    with pytest.raises(SyncError, match="trainer rank 1, whose export was never armed"):
        puller.pull(1, 0, 1)

"""A stand-in for vLLM's worker end of the in-place sync (its model, arena, plan and control server), for the tests
that need no vLLM: a plain module whose plan is written by hand as vLLM's loaders would record it
(`test_inplace_vllm.py` drives vLLM's own). The arena, the control server and the plan are the production classes."""

from __future__ import annotations

from pathlib import Path

import torch
from ring_ext_astate.arena import ParamArena
from ring_ext_astate.control import ControlServer
from ring_ext_astate.inplace import Welcome
from ring_ext_astate.plan import Destination, Plan


class FusedModel(torch.nn.Module):
    """q and k fused in one parameter (as vLLM's qkv_proj), a norm of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.qk = torch.nn.Parameter(torch.zeros(6, 4, dtype=torch.bfloat16))
        self.norm = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))


def fused_plan(arena: ParamArena, layout: dict) -> Plan:
    """What vLLM's loaders record for FusedModel: q -> rows 0-3 of qk, k -> rows 4-5, norm -> norm."""
    qk, norm = layout["qk"][0], layout["norm"][0]
    bf16 = "bfloat16"
    return Plan({"q": (Destination((), qk, (4, 4), (4, 1), bf16, "qk"),),
                 "k": (Destination((("narrow", (0, 0, 2), ()),), qk + 32, (2, 4), (4, 1), bf16, "qk"),),
                 "norm": (Destination((), norm, (4,), (1,), bf16, "norm"),)}, layout)


def stand_in_worker(tmp_path: Path):
    model = FusedModel()
    arena, layout = ParamArena.adopt(model.named_parameters())
    plan = fused_plan(arena, layout)
    plan.check_covers()
    state = {"version": 0}
    server = ControlServer(tmp_path / "run", 0, lambda: Welcome(0, (arena.name,), arena.size, plan, frozenset({"tied"}),
                                                               state["version"]),
                           lambda name, shape, dtype: name == "rotary")
    yield {"model": model, "arena": arena, "plan": plan, "server": server, "dir": tmp_path / "run", "state": state}
    server.close()
    arena.unlink()


def fused_weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"q": torch.randn(4, 4, generator=g), "k": torch.randn(4, 4, generator=g),  # k: 4 rows, 2 are ours (TP)
            "norm": torch.randn(4, generator=g), "tied": torch.randn(4, generator=g)}

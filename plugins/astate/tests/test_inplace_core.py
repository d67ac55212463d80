"""The in-place sync's verl-free, vLLM-free core: plan checks, replay, arena, control channel, sender and commit check.

The worker here is a plain module in this process standing in for vLLM's worker (its `load_weights`, which
`test_inplace_vllm.py` drives for real); the arena, the control socket, the sender and the commit check are the
production classes.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch

from ring_ext_astate.arena import Arenas, ParamArena, map_arena
from ring_ext_astate.control import ControlClient, ControlServer, SyncError, descriptor_path
from ring_ext_astate.inplace import InPlaceSender, Welcome, check_reports
from ring_ext_astate.plan import Destination, Plan, PlanError, merge_exactly_once, replay


def test_merge_exactly_once_names_both_writers_of_a_byte() -> None:
    assert merge_exactly_once([(0, 4, "a"), (4, 8, "b"), (10, 12, "c")]) == [(0, 8), (10, 12)]
    with pytest.raises(PlanError, match=r"bytes \[6, 8\) written twice: by a and by b"):
        merge_exactly_once([(0, 8, "a"), (6, 10, "b")])


def test_replay_applies_the_recorded_views_only() -> None:
    t = torch.arange(24.0).view(6, 4)
    assert torch.equal(replay(t, (("narrow", (0, 2, 2), ()),)), t[2:4])
    assert torch.equal(replay(t, (("chunk", (3,), ()), ("__getitem__", (1,), ()))), t[2:4])
    with pytest.raises(PlanError, match="'add' in a recorded chain is not a view"):
        replay(t, (("add", (1,), ()),))


class _FusedModel(torch.nn.Module):
    """q and k fused in one parameter (as vLLM's qkv_proj), a norm of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.qk = torch.nn.Parameter(torch.zeros(6, 4, dtype=torch.bfloat16))
        self.norm = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))


def _plan(arena: ParamArena, layout: dict) -> Plan:
    """What vLLM's loaders record for _FusedModel: q -> rows 0-3 of qk, k -> rows 4-5, norm -> norm."""
    qk, norm = layout["qk"][0], layout["norm"][0]
    bf16 = "bfloat16"
    return Plan({"q": (Destination((), qk, (4, 4), (4, 1), bf16, "qk"),),
                 "k": (Destination((("narrow", (0, 0, 2), ()),), qk + 32, (2, 4), (4, 1), bf16, "qk"),),
                 "norm": (Destination((), norm, (4,), (1,), bf16, "norm"),)}, layout)


@pytest.fixture
def worker(tmp_path: Path):
    model = _FusedModel()
    arena, layout = ParamArena.adopt(model.named_parameters())
    plan = _plan(arena, layout)
    plan.check_covers()
    state = {"version": 0}
    server = ControlServer(tmp_path / "run", 0, lambda: Welcome(0, (arena.name,), arena.size, plan, frozenset({"tied"}),
                                                               state["version"]),
                           lambda name, shape, dtype: name == "rotary")
    yield {"model": model, "arena": arena, "plan": plan, "server": server, "dir": tmp_path / "run", "state": state}
    server.close()
    arena.unlink()


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"q": torch.randn(4, 4, generator=g), "k": torch.randn(4, 4, generator=g),  # k: 4 rows, 2 are ours (TP)
            "norm": torch.randn(4, generator=g), "tied": torch.randn(4, generator=g)}


def test_a_sync_lands_in_the_parameters_and_commits(worker: dict) -> None:
    sender = InPlaceSender(str(descriptor_path(worker["dir"], 0)), timeout_s=5)
    w = _weights(0)
    stats = sender.write(w.items(), 1, verify=True)
    sender.report(1, 0, stats)
    reports = worker["server"].wait_reports(1, 1, timeout_s=5)
    assert check_reports(worker["plan"], reports, 1, worker["arena"].bytes, verify=True, rank=0) == 6 * 4 * 2 + 4 * 2
    qk = worker["model"].qk.detach()
    assert torch.equal(qk[:4], w["q"].bfloat16()) and torch.equal(qk[4:], w["k"][:2].bfloat16())
    assert torch.equal(worker["model"].norm.detach(), w["norm"].bfloat16())
    assert stats.bytes == worker["plan"].nbytes  # the worker's bytes, nothing more
    sender.close()


def test_the_commit_check_refuses_double_writes_gaps_old_versions_and_changed_bytes(worker: dict) -> None:
    sender = InPlaceSender(str(descriptor_path(worker["dir"], 0)), timeout_s=5)
    stats = sender.write(_weights(1).items(), 1, verify=True)
    plan, arena = worker["plan"], worker["arena"].bytes
    body = {"version": 1, "sender": 0, "plan": plan.digest, "ranges": stats.ranges, "digests": stats.digests}
    check_reports(plan, [body], 1, arena, verify=True, rank=0)
    with pytest.raises(SyncError, match="written twice"):
        check_reports(plan, [body, {**body, "sender": 1}], 1, arena, verify=False, rank=0)
    with pytest.raises(SyncError, match=r"wrote 48 of 56 planned bytes"):
        check_reports(plan, [{**body, "ranges": stats.ranges[:-1]}], 1, arena, verify=False, rank=0)
    with pytest.raises(SyncError, match="reported version 1, expected 2"):
        check_reports(plan, [body], 2, arena, verify=False, rank=0)
    with pytest.raises(SyncError, match="wrote with plan"):
        check_reports(plan, [{**body, "plan": "0" * 16}], 1, arena, verify=False, rank=0)
    arena[plan.params["norm"][0]] ^= 1
    check_reports(plan, [body], 1, arena, verify=False, rank=0)  # unverified syncs trust the sender's check
    with pytest.raises(SyncError, match=r"changed after sender 0 wrote them \(in 'norm'\)"):
        check_reports(plan, [body], 1, arena, verify=True, rank=0)
    sender.close()


def test_tensors_outside_the_plan_are_asked_about_once_and_unknown_ones_refused(worker: dict) -> None:
    sender = InPlaceSender(str(descriptor_path(worker["dir"], 0)), timeout_s=5)
    sender.write([*_weights(2).items(), ("rotary", torch.zeros(2))], 1, verify=False)  # the worker ignores it
    assert "rotary" in sender.welcome.ignored
    with pytest.raises(SyncError, match="sent no \\['norm'\\]"):
        sender.write([(k, v) for k, v in _weights(2).items() if k != "norm"], 1, verify=False)
    sender.close()


def test_strangers_are_refused_and_files_are_owner_only(worker: dict, tmp_path: Path) -> None:
    desc = descriptor_path(worker["dir"], 0)
    forged = tmp_path / "forged.json"
    forged.write_text(desc.read_text().replace('"secret": "', '"secret": "ff'))
    with pytest.raises(SyncError, match="does not prove this run's secret"):
        ControlClient(forged, 5).hello()
    assert worker["server"].refused == 1
    assert stat.S_IMODE(worker["dir"].stat().st_mode) == 0o700
    for p in (desc, worker["server"].path, Path(worker["arena"].path)):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    with pytest.raises(PlanError, match="not an astate arena name"):
        map_arena("../etc/passwd", 8)


def test_a_missing_report_times_out_naming_the_count(worker: dict) -> None:
    with pytest.raises(SyncError, match=r"sync 1: 0 of 2 sender report\(s\) within 0.2s"):
        worker["server"].wait_reports(1, 2, timeout_s=0.2)


def test_a_replaced_parameter_and_an_uncovered_one_are_caught(worker: dict) -> None:
    model, arena = worker["model"], worker["arena"]
    arena.check_unmoved(model.named_parameters())
    model.norm.data = model.norm.data.clone()
    with pytest.raises(PlanError, match="'norm' moved out of the astate arena"):
        arena.check_unmoved(model.named_parameters())
    partial = Plan({k: v for k, v in worker["plan"].destinations.items() if k != "norm"}, worker["plan"].params)
    with pytest.raises(PlanError, match=r"do not cover the parameters \['norm'\]"):
        partial.check_covers()
    strided = Plan({"q": (Destination((), 0, (4, 4), (1, 4), "bfloat16", "qk"),)}, {})
    with pytest.raises(PlanError, match="strided view"):
        strided.check_covers()


def test_shadow_writes_the_inactive_arena_and_the_commit_switches() -> None:
    model = _FusedModel()
    arenas = Arenas(model.named_parameters(), shadow=True)
    live0 = model.norm.data_ptr()
    assert arenas.target(1) is arenas.all[1] and arenas.target(2) is arenas.all[0]
    off, n = arenas.layout["norm"]
    arenas.target(1).bytes[off:off + n].view(torch.bfloat16).fill_(1.0)  # sync 1 lands in arena 1
    assert torch.equal(model.norm.detach(), torch.zeros(4, dtype=torch.bfloat16))  # serving: untouched
    arenas.commit(1, model.named_parameters())
    assert torch.equal(model.norm.detach(), torch.ones(4, dtype=torch.bfloat16)) and model.norm.data_ptr() != live0
    arenas.check_unmoved(model.named_parameters())  # the active arena's addresses now
    arenas.target(2).bytes[off:off + n].view(torch.bfloat16).fill_(7.0)  # sync 2 written, then it fails: no commit
    assert torch.equal(model.norm.detach(), torch.ones(4, dtype=torch.bfloat16))  # the old weights serve at once
    arenas.unlink()

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
from inplace_worker import FusedModel, fused_weights, stand_in_worker

from ring_ext_astate.arena import Arenas, map_arena
from ring_ext_astate.control import ControlClient, SyncError, descriptor_path
from ring_ext_astate.inplace import InPlaceSender, check_reports
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


@pytest.fixture
def worker(tmp_path: Path):
    yield from stand_in_worker(tmp_path)


def test_a_sync_lands_in_the_parameters_and_commits(worker: dict) -> None:
    sender = InPlaceSender(str(descriptor_path(worker["dir"], 0)), timeout_s=5)
    w = fused_weights(0)
    stats = sender.write(w.items(), 1, verify=True)
    sender.report(1, 0, stats)
    reports = worker["server"].wait_reports(1, 1, timeout_s=5)
    assert check_reports(worker["plan"], reports, 1, worker["arena"].bytes, verify=True, rank=0) == 6 * 4 * 2 + 4 * 2
    qk = worker["model"].qk.detach()
    assert torch.equal(qk[:4], w["q"].bfloat16()) and torch.equal(qk[4:], w["k"][:2].bfloat16())
    assert torch.equal(worker["model"].norm.detach(), w["norm"].bfloat16())
    assert stats.bytes == worker["plan"].nbytes  # the worker's bytes, nothing more
    sender.close()


def test_a_later_sync_takes_the_same_slices_of_new_tensors_wherever_they_lie(worker: dict) -> None:
    """The sender replays each slice's views once per source layout and then takes them with one as_strided: a new
    tensor at another storage offset, or with other strides, must still give its own rows."""
    sender = InPlaceSender(str(descriptor_path(worker["dir"], 0)), timeout_s=5)
    for v, (seed, lay) in enumerate([(0, "plain"), (1, "offset"), (2, "transposed"), (3, "offset")], start=1):
        w = fused_weights(seed)
        if lay == "offset":  # inside a larger buffer, as a flat-parameter shard is
            buf = torch.zeros(7 + sum(t.numel() for t in w.values()))
            at = 7
            for n, t in list(w.items()):
                w[n] = buf[at:at + t.numel()].view(t.shape).copy_(t)
                at += t.numel()
        if lay == "transposed":  # the same values, column-major
            w["k"] = w["k"].t().contiguous().t()
        stats = sender.write(w.items(), v, verify=False)
        sender.report(v, 0, stats)
        check_reports(worker["plan"], worker["server"].wait_reports(v, 1, timeout_s=5), v, worker["arena"].bytes,
                      verify=False, rank=0)
        qk = worker["model"].qk.detach()
        assert torch.equal(qk[:4], w["q"].bfloat16()) and torch.equal(qk[4:], w["k"][:2].bfloat16()), lay
        assert torch.equal(worker["model"].norm.detach(), w["norm"].bfloat16()), lay
    assert len(sender._views) > len(worker["plan"].destinations)  # the transposed k was replayed for its layout
    sender.close()


def test_the_commit_check_refuses_double_writes_gaps_old_versions_and_changed_bytes(worker: dict) -> None:
    sender = InPlaceSender(str(descriptor_path(worker["dir"], 0)), timeout_s=5)
    stats = sender.write(fused_weights(1).items(), 1, verify=True)
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


def test_shares_split_the_plan_exactly_once_balanced_by_bytes() -> None:
    nb = lambda n: (Destination((), 0, (n,), (1,), "uint8", "p"),)  # noqa: E731
    plan = Plan({"a": nb(100), "b": nb(60), "c": nb(50), "d": nb(10), "e": nb(0)}, {})
    for world in (1, 2, 3, 7):
        shares = [plan.share(r, world) for r in range(world)]
        assert sum(map(len, shares)) == 5 and len(frozenset().union(*shares)) == 5  # each destination once
        loads = [sum(plan.destinations[n][i].nbytes for n, i in sh) for sh in shares]
        assert max(loads) - min(loads) <= 100, (world, loads)  # at most the largest destination apart
    assert [plan.share(r, 2) for r in range(2)] == [frozenset({("a", 0), ("d", 0), ("e", 0)}),
                                                    frozenset({("b", 0), ("c", 0)})]  # 110 / 110
    with pytest.raises(ValueError, match="sender rank 2 outside a world of 2"):
        plan.share(2, 2)


def test_two_senders_each_write_their_share_and_the_worker_commits_both(worker: dict) -> None:
    """Several trainer ranks writing one worker (separate_async's direct path): the commit check needs both."""
    plan, arena = worker["plan"], worker["arena"].bytes
    w = fused_weights(3)
    senders = [InPlaceSender(str(descriptor_path(worker["dir"], 0)), timeout_s=5) for _ in range(2)]
    shares = [plan.share(r, 2) for r in range(2)]
    stats = [s.write(w.items(), 1, verify=True, share=sh) for s, sh in zip(senders, shares)]
    assert all(st.bytes > 0 for st in stats) and sum(st.bytes for st in stats) == plan.nbytes
    for r, (s, st) in enumerate(zip(senders, stats)):
        s.report(1, r, st)
    reports = worker["server"].wait_reports(1, 2, timeout_s=5)
    assert check_reports(plan, reports, 1, arena, verify=True, rank=0) == plan.nbytes
    qk = worker["model"].qk.detach()
    assert torch.equal(qk[:4], w["q"].bfloat16()) and torch.equal(qk[4:], w["k"][:2].bfloat16())
    def body(r: int, st) -> dict:
        return {"version": 1, "sender": r, "plan": plan.digest, "ranges": st.ranges, "digests": None}

    with pytest.raises(SyncError, match=r"wrote \d+ of 56 planned bytes"):  # one rank's share alone
        check_reports(plan, [body(0, stats[0])], 1, arena, verify=False, rank=0)
    whole = senders[0].write(w.items(), 1, verify=False)  # a rank that ignored the split: its bytes overlap
    with pytest.raises(SyncError, match="written twice"):
        check_reports(plan, [body(0, whole), body(1, stats[1])], 1, arena, verify=False, rank=0)
    with pytest.raises(SyncError, match=r"sent no \['norm'\]"):  # a share's tensor missing from the trainer's
        norm_rank = next(r for r, sh in enumerate(shares) if ("norm", 0) in sh)
        senders[norm_rank].write([(k, v) for k, v in w.items() if k != "norm"], 1, verify=False,
                                 share=shares[norm_rank])
    for s in senders:
        s.close()


def test_tensors_outside_the_plan_are_asked_about_once_and_unknown_ones_refused(worker: dict) -> None:
    sender = InPlaceSender(str(descriptor_path(worker["dir"], 0)), timeout_s=5)
    sender.write([*fused_weights(2).items(), ("rotary", torch.zeros(2))], 1, verify=False)  # the worker ignores it
    assert "rotary" in sender.welcome.ignored
    with pytest.raises(SyncError, match="sent no \\['norm'\\]"):
        sender.write([(k, v) for k, v in fused_weights(2).items() if k != "norm"], 1, verify=False)
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
    model = FusedModel()
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


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MAP_POPULATE"), reason="MAP_POPULATE is Linux's")
def test_a_senders_mapping_is_populated_so_its_first_write_takes_no_page_faults() -> None:
    import resource

    from ring_ext_astate.arena import ParamArena

    arena = ParamArena(64 << 20)  # 16,384 pages of 4 KiB, resident in the owner as a worker's parameters are
    arena.bytes.fill_(1)
    try:
        faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # noqa: E731
        mapped = map_arena(arena.name, arena.size)
        before = faults()
        mapped.fill_(2)  # the sender's first sync
        # < 1,000 of 16,384: other threads of this process (Ray, ZeroMQ) may fault a few pages meanwhile
        assert faults() - before < 1000, "the first write faulted page by page: the mapping was not populated"
        assert int(arena.bytes[-1]) == 2  # the owner's pages
    finally:
        arena.unlink()

"""Tests of ring_ext_astate.planner: coverage/ownership/zero-redundancy properties, hand-checked TP/fused/EP/FSDP
plans, sender balance under full replication, errors raised before planning, PlanCache and determinism."""

from __future__ import annotations

import pickle
from dataclasses import astuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ring_ext_astate import planner
from ring_ext_astate.layouts import (
    ShardedTensorMeta,
    fsdp_flat_shards,
    megatron_ep_layout,
    megatron_tp_layout,
    megatron_tp_shard,
    merge_layouts,
    vllm_fused_dest,
    vllm_tp_dest,
)
from ring_ext_astate.planner import (
    DestTensor,
    Interval,
    LayoutError,
    Piece,
    PlanCache,
    TensorMeta,
    Transfer,
    plan_transfers,
)

BIG = 1 << 20


def check_plan(tensors, trainer, rollout, plan, bucket_bytes):
    """Every dest element received exactly once, with the right source element, from a rank that owns it."""
    metas = {t.name: t for t in tensors}
    owned = {}
    for rank, per_tensor in trainer.items():
        for name, ivs in per_tensor.items():
            mask = owned.setdefault((rank, name), [False] * metas[name].numel)
            for iv in ivs:
                mask[iv.start:iv.stop] = [True] * iv.size
    got = {(r, d.name): [None] * d.numel for r, ds in rollout.items() for d in ds}
    for t in plan.transfers:
        assert t.nbytes == t.src.size * metas[t.src_tensor].itemsize <= bucket_bytes
        mask = owned.get((t.src_rank, t.src_tensor))
        assert mask is not None and t.src.stop <= len(mask) and all(mask[t.src.start:t.src.stop]), f"not owned: {t}"
        buf = got[(t.dst_rank, t.dst_tensor)]
        for k in range(t.src.size):
            assert buf[t.dst_offset + k] is None, f"received twice: {t}"
            buf[t.dst_offset + k] = (t.src_tensor, t.src.start + k)
    want_bytes = 0
    for r, ds in rollout.items():
        for d in ds:
            want = [None] * d.numel
            for p in d.pieces:
                want[p.dst_offset:p.dst_offset + p.src.size] = [(p.src_tensor, i) for i in range(*astuple(p.src))]
                want_bytes += p.src.size * metas[p.src_tensor].itemsize
            assert got[(r, d.name)] == want, (r, d.name)
    assert sum(t.nbytes for t in plan.transfers) == want_bytes  # zero redundancy
    assert sum(plan.bytes_per_sender().values()) == sum(plan.bytes_per_receiver().values()) == want_bytes
    assert plan.transfers == tuple(t for b in plan.buckets for t in b.transfers)
    assert [(b.src_rank, b.dst_rank) for b in plan.buckets] == sorted((b.src_rank, b.dst_rank) for b in plan.buckets)
    for b in plan.buckets:
        assert 0 < b.nbytes == sum(t.nbytes for t in b.transfers) <= bucket_bytes
        assert all((t.src_rank, t.dst_rank) == (b.src_rank, b.dst_rank) for t in b.transfers)


def random_partition(draw, numel):
    cuts = sorted(draw(st.sets(st.integers(1, numel - 1), max_size=3))) if numel > 1 else []
    bounds = [0, *cuts, numel]
    return [Interval(a, b) for a, b in zip(bounds, bounds[1:])]


@st.composite
def scenarios(draw, full_replication=False):
    tp = draw(st.integers(1, 3))
    tensors = [TensorMeta(f"t{i}", tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))),
                          draw(st.sampled_from([1, 2, 4]))) for i in range(draw(st.integers(1, 3)))]
    family = []
    if draw(st.booleans()):  # a qkv / gate_up-like family fused on the rollout side
        cols, itemsize = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 4]))
        family = [TensorMeta(f"f{j}", (tp * draw(st.integers(1, 3)), cols), itemsize)
                  for j in range(draw(st.integers(2, 3)))]
    tensors += family
    trainer = {}
    if full_replication:
        for r in range(draw(st.integers(2, 4))):
            trainer[r] = {t.name: [Interval(0, t.numel)] for t in tensors}
    else:
        groups, per_group = draw(st.integers(1, 3)), draw(st.integers(1, 4))
        for g in range(groups):
            ranks = list(range(g * per_group, (g + 1) * per_group))
            for t in tensors:
                for iv in random_partition(draw, t.numel):
                    trainer.setdefault(draw(st.sampled_from(ranks)), {}).setdefault(t.name, []).append(iv)
    dims = {}
    for t in tensors[:len(tensors) - len(family)]:
        choices = [d for d, s in enumerate(t.shape) if s % tp == 0]
        dims[t.name] = draw(st.sampled_from([*choices, None]))
    rollout = {}
    for k in range(draw(st.integers(1, 2))):  # rollout DP replicas
        for i in range(tp):
            ds = [vllm_tp_dest(f"dst.{n}", next(t for t in tensors if t.name == n), tp, i, dim)
                  for n, dim in dims.items()]
            if family:
                ds.append(vllm_fused_dest("dst.fused", [(f, 0) for f in family], tp, i))
            rollout[100 + k * tp + i] = draw(st.permutations(ds))
    bucket_bytes = draw(st.integers(4, 16 if full_replication else 48))
    return tensors, trainer, rollout, bucket_bytes


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_layouts_exact_once_from_owners(scenario):
    tensors, trainer, rollout, bucket_bytes = scenario
    plan = plan_transfers(tensors, trainer, rollout, bucket_bytes=bucket_bytes)
    check_plan(tensors, trainer, rollout, plan, bucket_bytes)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(full_replication=True))
def test_full_replication_balances_senders_within_one_bucket(scenario):
    tensors, trainer, rollout, bucket_bytes = scenario
    plan = plan_transfers(tensors, trainer, rollout, bucket_bytes=bucket_bytes)
    check_plan(tensors, trainer, rollout, plan, bucket_bytes)
    loads = [plan.bytes_per_sender().get(r, 0) for r in trainer]
    assert max(loads) - min(loads) <= bucket_bytes


def test_full_replication_splits_large_pieces_across_replicas():
    # 2 receivers x 1000-byte pieces, 3 replicas: whole-piece assignment would give loads 1000/1000/0
    w = TensorMeta("w", (100, 10), 2)
    trainer = {r: {"w": [Interval(0, 1000)]} for r in range(3)}
    rollout = {i: [vllm_tp_dest("w", w, 2, i, 0)] for i in range(2)}
    plan = plan_transfers([w], trainer, rollout, bucket_bytes=64)
    check_plan([w], trainer, rollout, plan, 64)
    loads = plan.bytes_per_sender()
    assert sorted(loads) == [0, 1, 2] and max(loads.values()) - min(loads.values()) <= 64


def test_sender_choice_least_loaded_then_lowest_rank():
    w, x = TensorMeta("w", (4,), 4), TensorMeta("x", (2,), 4)
    trainer = {5: {"w": [Interval(0, 4)], "x": [Interval(0, 2)]}, 3: {"w": [Interval(0, 4)]}}
    rollout = {0: [vllm_tp_dest("w", w, 1, 0, None)], 1: [vllm_tp_dest("x", x, 1, 0, None)],
               2: [vllm_tp_dest("w", w, 2, 0, 0)], 3: [vllm_tp_dest("w", w, 2, 1, 0)]}
    plan = plan_transfers([w, x], trainer, rollout, bucket_bytes=8)
    check_plan([w, x], trainer, rollout, plan, 8)
    # w on rank 0: chunks of 2 elements, tie -> rank 3, then rank 5 (less loaded); x: only rank 5 owns it;
    # rank 2's chunk: 3 has 8 B, 5 has 16 B -> rank 3; rank 3's chunk: tie at 16 B -> rank 3 (lowest)
    got = sorted((t.dst_rank, t.src.start, t.src_rank) for t in plan.transfers)
    assert got == [(0, 0, 3), (0, 2, 5), (1, 0, 5), (2, 0, 3), (3, 2, 3)]


def test_src_contiguous_but_dst_apart_is_not_merged():
    t = TensorMeta("t", (4,), 1)  # a destination holding t's two halves swapped
    swapped = DestTensor("s", 4, (Piece(2, "t", Interval(0, 2)), Piece(0, "t", Interval(2, 4))))
    trainer, rollout = {0: {"t": [Interval(0, 4)]}}, {0: [swapped]}
    plan = plan_transfers([t], trainer, rollout, bucket_bytes=BIG)
    check_plan([t], trainer, rollout, plan, BIG)
    assert [(x.src, x.dst_offset) for x in plan.transfers] == [(Interval(0, 2), 2), (Interval(2, 4), 0)]


def qkv_case():
    q, k, v = TensorMeta("q", (8, 4), 2), TensorMeta("k", (4, 4), 2), TensorMeta("v", (4, 4), 2)
    trainer = merge_layouts(*(megatron_tp_layout(m, 2, 0, [0, 1]) for m in (q, k, v)))
    rollout = {i: [vllm_fused_dest("qkv", [(q, 0), (k, 0), (v, 0)], 2, i)] for i in range(2)}
    return [q, k, v], trainer, rollout


def test_fused_qkv_exact_transfers():
    tensors, trainer, rollout = qkv_case()
    assert rollout[1][0] == DestTensor("qkv", 32, (Piece(0, "q", Interval(16, 32)), Piece(16, "k", Interval(8, 16)),
                                                   Piece(24, "v", Interval(8, 16))))
    plan = plan_transfers(tensors, trainer, rollout, bucket_bytes=BIG)
    check_plan(tensors, trainer, rollout, plan, BIG)
    assert plan.transfers == (
        Transfer(0, 0, "q", Interval(0, 16), "qkv", 0, 32),
        Transfer(0, 0, "k", Interval(0, 8), "qkv", 16, 16),
        Transfer(0, 0, "v", Interval(0, 8), "qkv", 24, 16),
        Transfer(1, 1, "q", Interval(16, 32), "qkv", 0, 32),
        Transfer(1, 1, "k", Interval(8, 16), "qkv", 16, 16),
        Transfer(1, 1, "v", Interval(8, 16), "qkv", 24, 16),
    )
    assert [len(b.transfers) for b in plan.buckets] == [3, 3]
    small = plan_transfers(tensors, trainer, rollout, bucket_bytes=40)  # q's 32 B + k's 16 B do not fit one bucket
    check_plan(tensors, trainer, rollout, small, 40)
    assert [b.nbytes for b in small.buckets] == [32, 32, 32, 32]


def test_gate_up_fused_slices():
    gate, up = TensorMeta("gate", (6, 2), 4), TensorMeta("up", (6, 2), 4)
    d = vllm_fused_dest("gate_up", [(gate, 0), (up, 0)], 2, 1)
    assert d == DestTensor("gate_up", 12, (Piece(0, "gate", Interval(6, 12)), Piece(6, "up", Interval(6, 12))))
    trainer = fsdp_flat_shards([gate, up], 1)
    plan = plan_transfers([gate, up], trainer, {5: [d]}, bucket_bytes=BIG)
    assert plan.transfers == (Transfer(0, 5, "gate", Interval(6, 12), "gate_up", 0, 24),
                              Transfer(0, 5, "up", Interval(6, 12), "gate_up", 6, 24))
    with pytest.raises(LayoutError, match="'k'"):  # trailing dims must agree to fuse along dim 0
        vllm_fused_dest("bad", [(gate, 0), (TensorMeta("k", (6, 4), 4), 0)], 2, 0)


def test_row_parallel_dim1_slices_are_per_row():
    o = TensorMeta("o", (4, 4), 2)
    assert megatron_tp_shard(o, 2, 1, 1) == ShardedTensorMeta("o", local_shape=(4, 2), global_shape=(4, 4),
                                                              global_offset=(0, 2), axis_fragmentations=(1, 2))
    rows = [Interval(2, 4), Interval(6, 8), Interval(10, 12), Interval(14, 16)]
    assert megatron_tp_layout(o, 2, 1, [7, 9])[9] == {"o": rows}
    dest = vllm_tp_dest("o", o, 2, 1, 1)
    assert dest.pieces == tuple(Piece(2 * i, "o", iv) for i, iv in enumerate(rows))
    trainer = megatron_tp_layout(o, 2, 0, [0, 1])  # trainer slices rows, rollout slices columns
    assert trainer == {0: {"o": [Interval(0, 8)]}, 1: {"o": [Interval(8, 16)]}}
    plan = plan_transfers([o], trainer, {1: [dest]}, bucket_bytes=BIG)
    assert plan.transfers == (
        Transfer(0, 1, "o", Interval(2, 4), "o", 0, 4), Transfer(0, 1, "o", Interval(6, 8), "o", 2, 4),
        Transfer(1, 1, "o", Interval(10, 12), "o", 4, 4), Transfer(1, 1, "o", Interval(14, 16), "o", 6, 4),
    )


def test_expert_parallel_trainer_to_tp_rollout():
    w = TensorMeta("experts.w1", (4, 4, 2), 2)  # E=4 experts of [4, 2]
    trainer = megatron_ep_layout(w, 2, [0, 1])
    assert trainer == {0: {w.name: [Interval(0, 16)]}, 1: {w.name: [Interval(16, 32)]}}
    rollout = {r: [vllm_tp_dest("w1", w, 2, r, 1)] for r in range(2)}  # TP slices each expert's rows
    assert [p.src for p in rollout[1][0].pieces] == [Interval(e * 8 + 4, e * 8 + 8) for e in range(4)]
    plan = plan_transfers([w], trainer, rollout, bucket_bytes=BIG)
    check_plan([w], trainer, rollout, plan, BIG)
    for r in range(2):
        mine = [t for t in plan.transfers if t.dst_rank == r]
        assert mine == [Transfer(e // 2, r, w.name, Interval(e * 8 + 4 * r, e * 8 + 4 * r + 4), "w1", 4 * e, 8)
                        for e in range(4)]
    assert plan.bytes_per_sender() == {0: 32, 1: 32}


def test_fsdp_flat_shards_coverage_and_split_tensor():
    a, b, c = TensorMeta("a", (3,), 4), TensorMeta("b", (2, 3), 4), TensorMeta("c", (5,), 4)
    layout = fsdp_flat_shards([a, b, c], 4)  # 14 elements, shards of 4 (the last holds 2 + padding)
    assert layout == {0: {"a": [Interval(0, 3)], "b": [Interval(0, 1)]}, 1: {"b": [Interval(1, 5)]},
                      2: {"b": [Interval(5, 6)], "c": [Interval(0, 3)]}, 3: {"c": [Interval(3, 5)]}}
    assert fsdp_flat_shards([a], 5)[4] == {}  # more ranks than elements: padding-only ranks
    rollout = {0: [vllm_tp_dest(t.name, t, 1, 0, None) for t in (a, b, c)]}
    plan = plan_transfers([a, b, c], layout, rollout, bucket_bytes=BIG)
    check_plan([a, b, c], layout, rollout, plan, BIG)
    assert [(t.src_rank, t.src, t.dst_offset) for t in plan.transfers if t.src_tensor == "c"] == [
        (2, Interval(0, 3), 0), (3, Interval(3, 5), 3)]


def assert_raises_before_planning(monkeypatch, tensors, trainer, rollout, *words):
    def no_transfer(*args, **kwargs):
        raise AssertionError("planning started before validation finished")

    monkeypatch.setattr(planner, "Transfer", no_transfer)
    with pytest.raises(LayoutError) as err:
        plan_transfers(tensors, trainer, rollout, bucket_bytes=BIG)
    for word in words:
        assert word in str(err.value)


def test_missing_source_element(monkeypatch):
    t, u = TensorMeta("t", (8,), 2), TensorMeta("u", (2,), 2)
    trainer = {0: {"t": [Interval(0, 5)], "u": [Interval(0, 2)]}, 1: {"t": [Interval(6, 8)]}}
    # rank 0 is fine; the hole [5, 6) is only needed by the last rollout rank
    rollout = {0: [vllm_tp_dest("u", u, 1, 0, None)], 3: [vllm_tp_dest("t", t, 1, 0, None)]}
    assert_raises_before_planning(monkeypatch, [t, u], trainer, rollout, "'t'", "rollout rank 3", "[5, 6)")


def test_unknown_and_out_of_range_tensors(monkeypatch):
    t = TensorMeta("t", (4,), 2)
    ok = {0: {"t": [Interval(0, 4)]}}
    ghost = {2: [DestTensor("x", 4, (Piece(0, "ghost", Interval(0, 4)),))]}
    assert_raises_before_planning(monkeypatch, [t], ok, ghost, "'ghost'", "rollout rank 2", "unknown")
    assert_raises_before_planning(monkeypatch, [t], {**ok, 4: {"nope": [Interval(0, 1)]}},
                                  {0: [vllm_tp_dest("t", t, 1, 0, None)]}, "'nope'", "trainer rank 4")
    far = {1: [DestTensor("t", 4, (Piece(0, "t", Interval(2, 6)),))]}
    assert_raises_before_planning(monkeypatch, [t], ok, far, "'t'", "rollout rank 1", "outside")
    assert_raises_before_planning(monkeypatch, [t], {3: {"t": [Interval(0, 9)]}}, far, "'t'", "trainer rank 3")


def test_bad_tiling(monkeypatch):
    t = TensorMeta("t", (4,), 2)
    with pytest.raises(LayoutError, match="'d'.*overlap"):
        DestTensor("d", 4, (Piece(0, "t", Interval(0, 3)), Piece(2, "t", Interval(0, 2))))
    with pytest.raises(LayoutError, match="'d'.*gap"):
        DestTensor("d", 4, (Piece(1, "t", Interval(0, 3)),))
    with pytest.raises(LayoutError, match="'d'"):
        DestTensor("d", 5, (Piece(0, "t", Interval(0, 4)),))
    # a layout whose __post_init__ never ran (e.g. tampered after unpickling) is caught by plan_transfers
    bad = pickle.loads(pickle.dumps(DestTensor("d", 4, (Piece(0, "t", Interval(0, 4)),))))
    object.__setattr__(bad, "numel", 3)
    trainer = {0: {"t": [Interval(0, 4)]}}
    assert_raises_before_planning(monkeypatch, [t], trainer, {6: [bad]}, "'d'", "rollout rank 6")
    twice = {6: [vllm_tp_dest("d", t, 1, 0, None)] * 2}
    assert_raises_before_planning(monkeypatch, [t], trainer, twice, "'d'", "rollout rank 6")


def test_plan_cache_reuses_until_layout_changes():
    tensors, trainer, rollout = qkv_case()
    cache = PlanCache()
    first = cache.get(tensors, trainer, rollout, BIG)
    again = cache.get(list(tensors), {r: dict(v) for r, v in reversed(trainer.items())}, dict(rollout), BIG)
    assert again is first and cache.computed == 1
    moved = {0: trainer[1], 1: trainer[0]}
    changed = cache.get(tensors, moved, rollout, BIG)
    assert changed is not first and cache.computed == 2 and changed.layout_digest != first.layout_digest
    assert {t.src_rank for t in changed.transfers if t.dst_rank == 0} == {1}
    assert cache.get(tensors, moved, rollout, 40) is not changed and cache.computed == 3


def test_deterministic():
    tensors, trainer, rollout = qkv_case()
    trainer = merge_layouts(trainer, {2: {m.name: [Interval(0, m.numel)] for m in tensors}})  # a full replica
    one = plan_transfers(tensors, trainer, rollout, bucket_bytes=24)
    two = plan_transfers(list(reversed(tensors)), dict(reversed(trainer.items())), rollout, bucket_bytes=24)
    assert one == two
    check_plan(tensors, trainer, rollout, one, 24)
    assert set(one.bytes_per_sender()) == {0, 1, 2}

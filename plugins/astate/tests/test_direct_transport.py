"""The direct shared-memory transport: senders write into each receiver's arena, between real processes."""

from __future__ import annotations

import os

import pytest
from astate_peers import Fleet, make_weights, same_weights
from ring_ext_astate.direct_transport import ALIGN, Arena, arena_offsets
from ring_ext_astate.segments import sweep_orphans
from ring_ext_astate.shm_transport import SyncError, _meta


def test_arena_offsets_are_aligned_and_disjoint():
    layout = (("a", (3,), "bfloat16"), ("b", (0,), "float32"), ("c", (5, 13), "float32"), ("d", (64,), "uint8"))
    offsets, size = arena_offsets(layout)
    assert offsets == {"a": 0, "b": ALIGN, "c": ALIGN, "d": 6 * ALIGN}  # 6, 0, 260 and 64 bytes, each rounded up
    assert size == 7 * ALIGN


def test_an_arena_larger_than_dev_shm_is_refused_before_any_write():
    st = os.statvfs("/dev/shm")
    sweep_orphans()  # an earlier test's killed peers would be swept by Arena() and change the listing
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(SyncError, match="/dev/shm has .* bytes free, the staging arena needs"):
        Arena((("w", (st.f_bavail * st.f_frsize + 1,), "uint8"),))
    assert set(os.listdir("/dev/shm")) == before


def test_ring_first_then_arena_views_then_a_new_arena_for_a_new_layout():
    shm = lambda: set(os.listdir("/dev/shm"))
    f = Fleet(world=2, n_recv=2, kind="direct")
    try:
        results, senders = f.sync(version=1, seed=1, fault="no_manifest")  # no layout yet: the slot ring
        assert all(same_weights(r, make_weights(1)) for r in results)
        assert [r.arena for r in f.receivers] == [None, None]
        results, senders = f.sync(version=2, seed=2)
        assert all(same_weights(r, make_weights(2)) for r in results) and [s[0] for s in senders] == ["ok"] * 2
        arenas = [r.arena for r in f.receivers]
        assert all(a.name in shm() for a in arenas)
        for recv, staged in zip(f.receivers, results):  # handed out in place: the senders' bytes, not a copy
            assert all(t.data_ptr() == recv.arena.views[_meta(n, t)].data_ptr() for n, t in staged.items())
        results, _ = f.sync(version=3, seed=3, fault="shrunk")  # another layout: a new arena, the old one gone
        shrunk = make_weights(3)
        shrunk["embed"] = shrunk["embed"][:-1]
        assert all(same_weights(r, shrunk) for r in results)
        assert all(r.arena.name != a.name and a.name not in shm() for r, a in zip(f.receivers, arenas))
        names = [r.arena.name for r in f.receivers]
    finally:
        f.close()
    assert not set(names) & shm()  # closing a receiver unlinks its arena

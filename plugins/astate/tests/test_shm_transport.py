"""The shared-memory transport between real processes: exact bytes, versions, and all-or-nothing on faults."""

from __future__ import annotations

import time

import pytest
from astate_peers import TIMEOUT, Fleet, make_weights, same_weights
from ring_ext_astate.shm_transport import SyncError, _meta, owned_byte_range


@pytest.fixture(scope="module", params=["shm", "direct"])
def fleet(request):
    """`shm`: the slot ring; `direct`: senders write into the receivers' arenas (every sync here has a manifest)."""
    f = Fleet(world=3, n_recv=2, kind=request.param)
    yield f
    f.close()


def test_owned_ranges_tile_each_tensor_without_overlap():
    for nbytes, item, world in [(0, 4, 3), (8, 4, 3), (2 * 97, 2, 4), (4 * 1000, 4, 7)]:
        ranges = [owned_byte_range(nbytes, item, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == nbytes
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [b - a for a, b in ranges]
        assert max(sizes) - min(sizes) <= item and all(s % item == 0 for s in sizes)


def test_round_trip_is_bit_exact_and_second_sync_updates(fleet):
    results, senders = fleet.sync(version=1, seed=1)
    src = make_weights(1)
    assert all(not isinstance(r, Exception) and same_weights(r, src) for r in results), results
    total = sum(t.nbytes for t in src.values())
    assert [s[0] for s in senders] == ["ok"] * 3
    assert sum(s[2] for s in senders) == total  # each byte sent once, whatever the receiver count
    assert max(s[2] for s in senders) - min(s[2] for s in senders) <= 4 * len(src)  # balanced to an element
    results2, _ = fleet.sync(version=2, seed=2)
    assert all(same_weights(r, make_weights(2)) for r in results2)
    assert not same_weights(results2[0], src)


def test_corrupted_bucket_is_detected_and_nothing_is_returned(fleet):
    results, senders = fleet.sync(version=3, seed=3, fault="corrupt")
    assert all(isinstance(r, SyncError) for r in results)
    assert any("checksum mismatch" in str(r) and "sender 2" in str(r) for r in results)
    assert all(s[0] == "error" for s in senders)  # every sender learns the sync failed
    results, _ = fleet.sync(version=4, seed=4)  # the transport is usable again
    assert all(same_weights(r, make_weights(4)) for r in results)


def test_layout_mismatch_is_refused_from_the_manifest(fleet):
    expected = {n: _meta(n, t) for n, t in make_weights(0).items()}
    results, senders = fleet.sync(version=5, seed=5, fault="shrunk", expected=expected)
    assert all(isinstance(r, SyncError) and "layout mismatch on tensor 'embed'" in str(r) for r in results)
    assert all(s[0] == "error" for s in senders)


DEAD_TIMEOUT = 3.0


@pytest.mark.parametrize("kind", ["shm", "direct"])
def test_killed_sender_ends_in_error_within_timeout(kind: str):
    f = Fleet(world=2, n_recv=1, kind=kind)
    try:
        # TIMEOUT covers a freshly spawned sender's first sync; once both answered one, a dead one is waited out for
        # DEAD_TIMEOUT (the timeout is what ends the wait: the length of that wait is not what this test measures)
        assert all(not isinstance(r, Exception) for r in f.sync(version=1, seed=1)[0])
        f.receivers[0].timeout_s = DEAD_TIMEOUT
        t0 = time.monotonic()
        results, senders = f.sync(version=2, seed=2, fault="die")
        assert time.monotonic() - t0 < 3 * DEAD_TIMEOUT
        assert isinstance(results[0], SyncError)
        assert "sender(s) [1]" in str(results[0]) or "no commit" in str(results[0])
        assert f.procs[1].exitcode == 17
    finally:
        f.close()

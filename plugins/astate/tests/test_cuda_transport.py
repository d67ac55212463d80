"""The CUDA IPC transport between real processes on one GPU: exact bytes, each byte sent once, and all-or-nothing
on a corrupted bucket or a dead sender. The device checksum's properties are checked on any machine."""

from __future__ import annotations

import time

import pytest
import torch
from astate_peers import TIMEOUT, Fleet, make_weights, same_weights
from ring_ext_astate.cuda_transport import device_digest
from ring_ext_astate.shm_transport import SyncError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU (run on a GPU host)")


def test_device_digest_depends_on_content_only():
    data = torch.randint(0, 256, (1001,), dtype=torch.uint8)
    shifted = torch.zeros(1004, dtype=torch.uint8)
    shifted[3:] = data  # same bytes at an address that is not 8-byte aligned
    assert device_digest(data) == device_digest(shifted[3:]) != device_digest(data[:-1])
    for pos in (0, 7, 8, 500, 995, 1000):  # a flipped byte in any word or in the tail changes it
        bad = data.clone()
        bad[pos] ^= 0x01
        assert device_digest(bad) != device_digest(data), pos
    assert device_digest(torch.empty(0, dtype=torch.uint8)) == (0, 0, 0)


@pytest.fixture(scope="module")
def fleet():
    f = Fleet(world=3, n_recv=2, kind="cuda")
    yield f
    f.close()


@needs_cuda
def test_round_trip_is_bit_exact_on_the_device_and_second_sync_updates(fleet):
    results, senders = fleet.sync(version=1, seed=1)
    src = make_weights(1)
    assert all(not isinstance(r, Exception) and same_weights(r, src) for r in results), results
    assert all(t.is_cuda for r in results for t in r.values())  # assembled on the GPU, not through the host
    assert [s[0] for s in senders] == ["ok"] * 3
    assert sum(s[2] for s in senders) == sum(t.nbytes for t in src.values())  # each byte sent once
    results2, _ = fleet.sync(version=2, seed=2)
    assert all(same_weights(r, make_weights(2)) for r in results2)


@needs_cuda
def test_corrupted_device_bucket_is_detected_then_the_next_sync_works(fleet):
    results, senders = fleet.sync(version=3, seed=3, fault="corrupt")
    assert all(isinstance(r, SyncError) for r in results)
    assert any("checksum mismatch" in str(r) and "sender 2" in str(r) for r in results)
    assert all(s[0] == "error" for s in senders)
    results, _ = fleet.sync(version=4, seed=4)
    assert all(same_weights(r, make_weights(4)) for r in results)


@needs_cuda
def test_killed_sender_ends_in_error_within_timeout():
    f = Fleet(world=2, n_recv=1, kind="cuda")
    try:
        t0 = time.monotonic()
        results, _ = f.sync(version=1, seed=1, fault="die")
        assert time.monotonic() - t0 < 3 * TIMEOUT
        assert isinstance(results[0], SyncError)
        assert f.procs[1].exitcode == 17
    finally:
        f.close()

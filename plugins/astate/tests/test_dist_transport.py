"""The torch.distributed (gloo) transport between real processes, each its own gloo rank: exact bytes, each byte
sent once, versions, and all-or-nothing on a corrupted bucket or a dead sender."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
from astate_dist_peers import peer_main
from astate_peers import SLOT, TIMEOUT, make_weights, same_weights
from ring_ext_astate.dist_transport import free_port


class DistFleet:
    def __init__(self, n_send: int, n_recv: int) -> None:
        ctx, port = mp.get_context("spawn"), free_port("127.0.0.1")
        self.out = ctx.Queue()
        self.peers = [("send", i) for i in range(n_send)] + [("recv", i) for i in range(n_recv)]
        self.ins = {p: ctx.Queue() for p in self.peers}
        self.procs = {p: ctx.Process(target=peer_main, args=(*p, n_send, n_recv, port, self.ins[p], self.out,
                                                             SLOT, TIMEOUT)) for p in self.peers}
        for proc in self.procs.values():
            proc.start()
        addrs = {(m[1], m[2]): m[3] for m in (self.out.get(timeout=120) for _ in self.peers)}
        for role, i in self.peers:
            other = "recv" if role == "send" else "send"
            self.ins[(role, i)].put([addrs[(other, j)] for j in range(n_recv if other == "recv" else n_send)])

    def sync(self, version: int, seed: int, fault: str = "", verify: bool = True, wait_for=None) -> dict:
        """Start one sync everywhere; return {(role, idx): (status, payload)} of the peers in `wait_for` (all)."""
        for q in self.ins.values():
            q.put((version, seed, fault, verify))
        results, want = {}, set(self.peers if wait_for is None else wait_for)
        while not want <= set(results):
            m = self.out.get(timeout=3 * TIMEOUT + 10)
            results[(m[0], m[1])] = (m[2], m[3])
        return results

    def close(self) -> None:
        for p, proc in self.procs.items():
            if proc.is_alive():
                self.ins[p].put(None)
        for proc in self.procs.values():
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


@pytest.fixture(scope="module")
def fleet():
    f = DistFleet(n_send=3, n_recv=2)
    yield f
    f.close()


def test_round_trip_is_bit_exact_each_byte_sent_once_and_second_sync_updates(fleet):
    results = fleet.sync(version=1, seed=1)
    src = make_weights(1)
    received = [results[("recv", i)] for i in range(2)]
    assert all(status == "ok" and same_weights(got, src) for status, got in received), results
    moved = [results[("send", i)][1] for i in range(3)]
    assert sum(moved) == sum(t.nbytes for t in src.values())  # no byte twice, no rank-0 funnel
    assert max(moved) - min(moved) <= 4 * len(src)
    results = fleet.sync(version=2, seed=2)
    assert all(same_weights(results[("recv", i)][1], make_weights(2)) for i in range(2))


def test_corrupted_bucket_is_detected_and_the_next_sync_works(fleet):
    results = fleet.sync(version=3, seed=3, fault="corrupt")
    assert all(results[("recv", i)][0] == "error" for i in range(2))
    assert any("checksum mismatch" in results[("recv", i)][1] and "sender 2" in results[("recv", i)][1]
               for i in range(2))
    assert all(results[("send", i)][0] == "error" for i in range(3))  # every sender learns it failed
    results = fleet.sync(version=4, seed=4)
    assert all(same_weights(results[("recv", i)][1], make_weights(4)) for i in range(2))


def test_dead_sender_ends_in_error_within_the_timeout():
    f = DistFleet(n_send=2, n_recv=1)
    try:
        t0 = time.monotonic()
        results = f.sync(version=1, seed=1, fault="die", wait_for=[("recv", 0), ("send", 0)])
        assert time.monotonic() - t0 < 3 * TIMEOUT
        status, why = results[("recv", 0)]
        assert status == "error" and ("sender 1" in why or "sender(s) [1]" in why), why
        assert results[("send", 0)][0] == "error"  # the surviving sender learns it too, it does not hang
        f.procs[("send", 1)].join(timeout=10)
        assert f.procs[("send", 1)].exitcode == 17
    finally:
        f.close()

"""Shared-memory transport of the AState-like weight sync: N sender processes -> M receiver processes, one host.

No verl import. Each sender owns a balanced byte range of every tensor (`owned_byte_range`: no byte is
sent twice, no rank-0 funnel) and streams it through a ring of `n_slots` shared-memory buckets, so memory
stays bounded and packing bucket k+1 overlaps the receivers copying bucket k out. Control messages go over
ZeroMQ IPC sockets; every wait has a timeout.

A sync is all-or-nothing: receivers assemble into private staging tensors, check every bucket's xxh3
checksum, check coverage (every byte of every tensor exactly once) and, when asked, a bit-exact digest of
each assembled range against the sender's source; they report (with the version) to every sender, and only
when every sender answers `commit` does `receive` return the new tensors. Any failure raises `SyncError`
naming the tensor and the rank, and the caller's previous weights are untouched.
"""

from __future__ import annotations

import mmap
import os
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import xxhash
import zmq

from ring_ext_astate.errors import SyncError
from ring_ext_astate.messages import Ack, Begin, Bucket, End, Error, Meta, Report, Vote
from ring_ext_astate.segments import create_segment, socket_path


def owned_byte_range(nbytes: int, itemsize: int, rank: int, world: int) -> tuple[int, int]:
    """Sender `rank`'s share of a tensor: element-aligned, sizes differ by at most one element."""
    n = nbytes // itemsize
    return (n * rank // world) * itemsize, (n * (rank + 1) // world) * itemsize


def _meta(name: str, t: torch.Tensor) -> Meta:
    return name, tuple(t.shape), str(t.dtype).removeprefix("torch.")


def _map_segment(name: str, size: int, reserve: bool = False) -> mmap.mmap:
    """Map a peer's segment without multiprocessing's resource tracker (it would unlink it on our exit).

    `reserve` allocates its pages now: a lack of room raises OSError here instead of SIGBUS at a later write."""
    fd = os.open(f"/dev/shm/{name.lstrip('/')}", os.O_RDWR)
    try:
        if reserve:
            os.posix_fallocate(fd, 0, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _bucket_used(extents: list) -> int:
    """Bytes a bucket fills: the end of its furthest extent (meta, start, end, offset in the bucket)."""
    return max(off + b - a for _, a, b, off in extents)


def host_digest(buf: torch.Tensor) -> int:
    return xxhash.xxh3_64_intdigest(memoryview(buf.numpy())) if buf.numel() else 0


class _Channel:
    """A bound PULL socket (our inbox) plus PUSH sockets to peers' inboxes."""

    def __init__(self, tcp_host: str | None = None) -> None:
        self.ctx = zmq.Context.instance()
        self.inbox = self.ctx.socket(zmq.PULL)
        if tcp_host is None:  # one host: a Unix socket
            self.address = f"ipc://{socket_path()}"
            self.inbox.bind(self.address)
        else:  # across hosts: TCP on an ephemeral port of `tcp_host`
            port = self.inbox.bind_to_random_port(f"tcp://{tcp_host}")
            self.address = f"tcp://{tcp_host}:{port}"
        self.peers: list[zmq.Socket] = []

    def connect(self, addresses: list[str]) -> None:
        for s in self.peers:  # a new topology replaces the old one
            s.close(linger=0)
        self.peers = []
        for a in addresses:
            s = self.ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(a)
            self.peers.append(s)

    def send(self, peer: int, msg: NamedTuple) -> None:  # one of ring_ext_astate.messages
        self.peers[peer].send_pyobj(msg)

    def recv(self, deadline: float) -> Any:  # a message, or None at the deadline
        left_ms = max(0, int((deadline - time.monotonic()) * 1000))
        return self.inbox.recv_pyobj() if self.inbox.poll(left_ms) else None

    def close(self) -> None:
        for s in [self.inbox, *self.peers]:
            s.close(linger=0)
        self.peers = []
        if self.address.startswith("ipc://"):  # libzmq leaves the socket file behind
            Path(self.address.removeprefix("ipc://")).unlink(missing_ok=True)


@dataclass
class SyncStats:
    bytes_moved: int = 0
    buckets: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"pack": 0.0, "wait": 0.0, "commit": 0.0})


class ShmSender:
    def __init__(self, rank: int, world: int, slot_bytes: int, n_slots: int = 4, timeout_s: float = 60.0) -> None:
        self.rank, self.world, self.slot_bytes, self.timeout_s = rank, world, slot_bytes, timeout_s
        self.chan = _Channel()
        self.shms = [create_segment(slot_bytes) for _ in range(n_slots)]
        self.slots = [torch.frombuffer(s.buf, dtype=torch.uint8) for s in self.shms]

    def address(self) -> dict[str, Any]:
        return {"address": self.chan.address, "slots": [s.name for s in self.shms], "slot_bytes": self.slot_bytes}

    def connect(self, receivers: list[str]) -> None:
        self.chan.connect(receivers)
        self.n_recv = len(receivers)

    def _broadcast(self, msg: NamedTuple) -> None:
        for r in range(self.n_recv):
            self.chan.send(r, msg)

    def _take_report(self, msg: Report) -> None:
        """Keep a receiver's report of this sync; a failed one ends the sync here, naming the receiver's error."""
        if not msg.ok:
            raise SyncError(f"sender {self.rank}: receiver {msg.rank} failed: {msg.why}")
        self._reports[msg.rank] = msg

    def _drain(self, pending: dict[int, set[int]], free: deque[int], until_free: bool, version: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        while (not free) if until_free else any(pending.values()):
            msg = self.chan.recv(deadline)
            if msg is None:
                waiting = sorted({r for rs in pending.values() for r in rs})
                raise SyncError(f"sender {self.rank}: no ack from receiver(s) {waiting} within {self.timeout_s}s")
            if msg.version != version:  # left over from an earlier, failed sync
                continue
            if isinstance(msg, Report):
                self._take_report(msg)
            if isinstance(msg, Ack):
                pending[msg.slot].discard(msg.rank)
                if not pending[msg.slot]:
                    free.append(msg.slot)
                    del pending[msg.slot]

    def _publish(self, version: int, slot: int, used: int, extents: list) -> None:
        """Announce a packed slot; receivers copy it out of shared memory and ack it."""
        self._broadcast(Bucket(self.rank, version, slot, extents, self._digest(self.slots[slot][:used])))

    def send(self, tensors: Iterable[tuple[str, torch.Tensor]], version: int, *, verify: bool = False,
             manifest: list[Meta] | None = None, whole: bool = False) -> SyncStats:
        """Stream this rank's share of every tensor; returns once every receiver committed (else SyncError).

        `whole`: the tensors are this rank's alone (each rank sends others), so every byte of each is sent."""
        stats, owned = SyncStats(), []
        self._reports: dict[int, Report] = {}
        self._broadcast(Begin(self.rank, version, manifest))
        try:
            self._open_stream(version, manifest, stats)
            for name, t in tensors:
                t0 = time.perf_counter()
                src = self._flat_bytes(t)
                a, b = (0, src.numel()) if whole else owned_byte_range(src.numel(), t.element_size(), self.rank,
                                                                       self.world)
                owned.append((_meta(name, t), a, b, self._digest(src[a:b]) if verify else None))
                self._put(owned[-1][0], src, a, b)
                stats.bytes_moved += b - a
                stats.seconds["pack"] += time.perf_counter() - t0
            self._end_stream()
        except SyncError:
            raise
        except BaseException as e:  # the weights generator failed: tell receivers instead of leaving them waiting
            self._broadcast(Error(self.rank, version, f"sender {self.rank} failed: {e!r}"))
            raise
        tc = time.perf_counter()
        self._broadcast(End(self.rank, version, owned))
        self._commit(version)
        stats.seconds["commit"] = time.perf_counter() - tc
        return stats

    # The data path: a ring of slots, each announced once full and refilled once every receiver acked it.
    def _open_stream(self, version: int, manifest: list[Meta] | None, stats: SyncStats) -> None:
        self._version, self._stats = version, stats
        self._free, self._pending = deque(range(len(self.slots))), {}
        self._slot, self._off, self._extents = None, 0, []

    def _put(self, meta: Meta, src: torch.Tensor, a: int, b: int) -> None:
        """Pack bytes [a, b) of `src` into slots, announcing each slot as it fills."""
        pos = a
        while pos < b:
            if self._slot is None:
                tw = time.perf_counter()
                self._drain(self._pending, self._free, until_free=True, version=self._version)
                self._stats.seconds["wait"] += time.perf_counter() - tw
                self._slot = self._free.popleft()
            n = min(b - pos, self.slot_bytes - self._off)
            self.slots[self._slot][self._off:self._off + n].copy_(src[pos:pos + n])
            self._extents.append((meta, pos, pos + n, self._off))
            self._off, pos = self._off + n, pos + n
            if self._off == self.slot_bytes:
                self._flush()

    def _flush(self) -> None:
        if self._slot is not None and self._extents:
            self._publish(self._version, self._slot, self._off, self._extents)
            self._pending[self._slot] = set(range(self.n_recv))
            self._stats.buckets += 1
        elif self._slot is not None:
            self._free.appendleft(self._slot)
        self._slot, self._off, self._extents = None, 0, []

    def _end_stream(self) -> None:
        """Announce the last, partly filled slot and wait until every receiver has read every slot."""
        self._flush()
        tw = time.perf_counter()
        self._drain(self._pending, self._free, until_free=False, version=self._version)
        self._stats.seconds["wait"] += time.perf_counter() - tw

    def _commit(self, version: int) -> None:
        deadline, reports = time.monotonic() + self.timeout_s, self._reports
        while len(reports) < self.n_recv:
            msg = self.chan.recv(deadline)
            if msg is None:
                missing = sorted(set(range(self.n_recv)) - set(reports))
                self._broadcast(Vote(self.rank, version, False))
                raise SyncError(f"sender {self.rank}: no report from receiver(s) {missing} within {self.timeout_s}s")
            if isinstance(msg, Report) and msg.version == version:
                reports[msg.rank] = msg
        bad = [m for m in reports.values() if not m.ok]
        self._broadcast(Vote(self.rank, version, not bad))
        if bad:
            raise SyncError(f"sender {self.rank}: receiver {bad[0].rank} failed sync {version}: {bad[0].why}")

    def _flat_bytes(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor's bytes on the device the slots live on."""
        return t.detach().contiguous().cpu().view(-1).view(torch.uint8)

    _digest = staticmethod(host_digest)

    def close(self) -> None:
        self.chan.close()
        self.slots = []
        for s in self.shms:
            s.close()
            s.unlink()
        self.shms = []


class ShmReceiver:
    # False: a failure raises at once (shared memory needs no draining). The distributed transport sets True: bytes
    # already sent must still be received, or they would be read as the next sync's.
    drain_on_failure = False
    staging_device: torch.device | str = "cpu"
    _digest = staticmethod(host_digest)

    def __init__(self, rank: int, timeout_s: float = 60.0) -> None:
        self.rank, self.timeout_s = rank, timeout_s
        self.chan = _Channel()
        self.maps: dict[str, torch.Tensor] = {}  # sender segments, mapped once (fresh maps fault on every page)
        self.pool: dict[Meta, torch.Tensor] = {}  # staging buffers reused sync after sync, for the same reason

    def address(self) -> dict[str, Any]:
        return {"address": self.chan.address}

    def connect(self, senders: list[dict[str, Any]]) -> None:
        self.chan.connect([s["address"] for s in senders])
        for s in senders:
            for n in s["slots"]:
                if n not in self.maps:
                    self.maps[n] = torch.frombuffer(_map_segment(n, s["slot_bytes"]), dtype=torch.uint8)
        self.slots = [[self.maps[n] for n in s["slots"]] for s in senders]

    def _report(self, version: int, ok: bool, why: str = "") -> None:
        for s in range(len(self.slots)):
            self.chan.send(s, Report(self.rank, version, ok, why))

    def receive(self, version: int, *, expected: dict[str, Meta] | None = None,
                verify: bool = False) -> dict[str, torch.Tensor]:
        """Assemble one sync; returns {name: tensor} only after every sender committed, else SyncError.

        The returned tensors are staging buffers that the next `receive` reuses: apply them before calling it."""
        try:
            staged = self._assemble(version, expected, verify)
        except SyncError as e:
            self._report(version, False, str(e))
            raise
        self._report(version, True)
        self._await_commit(version)
        return staged

    def _fail(self, why: str) -> SyncError:
        return SyncError(f"receiver {self.rank}: {why}")

    def _fetch(self, sender: int, slot: int, used: int) -> torch.Tensor:
        """The bytes of an announced bucket: here, the sender's shared-memory slot itself."""
        return self.slots[sender][slot]

    def _ack(self, sender: int, version: int, slot: int) -> None:
        """Tell `sender` its slot may be refilled: we are done reading it."""
        self.chan.send(sender, Ack(self.rank, version, slot))

    def _expect(self, meta: Meta, sender: int, want: Meta | None) -> None:
        if want != meta:
            raise self._fail(f"layout mismatch on tensor {meta[0]!r} from sender {sender}: got {meta[1:]}, "
                             f"expected {want[1:] if want else 'no such tensor'}")

    def _check(self, meta: Meta, sender: int, expected: dict[str, Meta] | None, staged: dict) -> torch.Tensor:
        name = meta[0]
        self._expect(meta, sender, expected.get(name) if expected is not None else staged.get(name, (meta,))[0])
        if name not in staged:
            buf = self.pool.get(meta)
            if buf is None:
                buf = torch.empty(meta[1], dtype=getattr(torch, meta[2]), device=self.staging_device)
            staged[name] = (meta, buf, [])
        return staged[name][1]

    def _assemble(self, version: int, expected: dict[str, Meta] | None, verify: bool) -> dict[str, torch.Tensor]:
        staged: dict[str, tuple[Meta, torch.Tensor, list]] = {}
        ended: dict[int, list] = {}
        failure: SyncError | None = None
        while len(ended) < len(self.slots):
            msg = self.chan.recv(time.monotonic() + self.timeout_s)
            if msg is None:
                missing = sorted(set(range(len(self.slots))) - set(ended))
                raise self._fail(f"timed out after {self.timeout_s}s waiting for sender(s) {missing}")
            sender, v = msg.rank, msg.version
            if v < version:  # left over from an earlier, failed sync (versions only grow)
                continue
            if v != version:
                raise self._fail(f"sender {sender} sent version {v}, expected {version}")
            if isinstance(msg, Error):
                raise self._fail(msg.why)
            if failure is not None:  # keep the data path in step: consume what was announced, then fail
                if isinstance(msg, Bucket):
                    self._fetch(sender, msg.slot, _bucket_used(msg.extents))
                    self._ack(sender, version, msg.slot)
                elif isinstance(msg, End):
                    ended[sender] = []
                continue
            try:
                self._handle(msg, version, expected, staged, ended)
            except SyncError as e:
                if not self.drain_on_failure:
                    raise
                failure = e
                if isinstance(msg, Bucket):  # its bytes were consumed; the sender waits for the ack
                    self._ack(sender, version, msg.slot)
        if failure is not None:
            raise failure
        self._check_coverage(staged, ended, verify)
        self.pool = {meta: t for meta, t, _ in staged.values()}
        return {name: t for name, (_, t, _) in staged.items()}

    def _handle(self, msg: NamedTuple, version: int, expected: dict[str, Meta] | None, staged: dict,
                ended: dict) -> None:
        sender = msg.rank
        if isinstance(msg, Begin) and msg.manifest is not None and expected is not None:
            for m in msg.manifest:  # refused before any byte of this sync is copied
                self._expect(m, sender, expected.get(m[0]))
            if {m[0] for m in msg.manifest} != set(expected):
                raise self._fail(f"sender {sender} manifest names differ from the expected layout: "
                                 f"{sorted({m[0] for m in msg.manifest} ^ set(expected))[:5]}")
        elif isinstance(msg, Bucket):
            slot, extents, checksum = msg.slot, msg.extents, msg.checksum
            used = _bucket_used(extents)
            buf = self._fetch(sender, slot, used)
            if self._digest(buf[:used]) != checksum:
                raise self._fail(f"checksum mismatch in a bucket from sender {sender} "
                                 f"carrying {sorted({e[0][0] for e in extents})}")
            for meta, a, b, off in extents:
                dst = self._check(meta, sender, expected, staged).view(-1).view(torch.uint8)
                dst[a:b].copy_(buf[off:off + b - a])
                staged[meta[0]][2].append((a, b, sender))
            self._ack(sender, version, slot)
        elif isinstance(msg, End):
            ended[sender] = msg.owned
            for meta, a, b, _ in msg.owned:
                self._check(meta, sender, expected, staged)

    def _check_coverage(self, staged: dict, ended: dict[int, list], verify: bool) -> None:
        for name, (meta, t, pieces) in staged.items():
            nbytes, pos = t.numel() * t.element_size(), 0
            for a, b, s in sorted(pieces):
                if a != pos:
                    raise self._fail(f"tensor {name!r}: bytes [{pos}, {a}) {'missing' if a > pos else 'sent twice'}"
                                     f" (sender {s})")
                pos = b
            if pos != nbytes:
                raise self._fail(f"tensor {name!r}: received {pos} of {nbytes} bytes")
        if verify:
            owned = {(meta[0], a, b, s): d for s, items in ended.items() for meta, a, b, d in items}
            for (name, a, b, s), d in owned.items():
                got = self._digest(staged[name][1].view(-1).view(torch.uint8)[a:b])
                if got != d:
                    raise self._fail(f"tensor {name!r} bytes [{a}, {b}) from sender {s} differ from the source")

    def _await_commit(self, version: int) -> None:
        deadline, votes = time.monotonic() + self.timeout_s, {}
        while len(votes) < len(self.slots):
            msg = self.chan.recv(deadline)
            if msg is None:
                raise self._fail(f"no commit from sender(s) {sorted(set(range(len(self.slots))) - set(votes))}")
            if isinstance(msg, Vote) and msg.version == version:
                votes[msg.rank] = msg.commit
        if not all(votes.values()):
            raise self._fail(f"sync {version} aborted by sender(s) {[s for s, ok in votes.items() if not ok]}")

    def close(self) -> None:
        self.chan.close()
        self.slots, self.maps, self.pool = [], {}, {}  # the maps close when the last tensor view on them goes

"""Direct shared-memory transport of the AState-like weight sync: senders write straight into the receivers' staging.

No verl import. The protocol of `shm_transport` (begin with the manifest, balanced byte shares, an xxh3 checksum per
`slot_bytes` of data, coverage and optional bit-exact digests, all-or-nothing commit with versions), one copy fewer:
once the layout is known (the sender passes a manifest, as the engine does from its second sync on), each receiver
keeps its staging buffers in one shared-memory arena and answers `begin` with the arena's name and every tensor's
offset in it. Senders copy their share of each tensor straight into every receiver's arena and announce each
`slot_bytes` of it with the checksum of the source bytes; a receiver checksums the arena bytes themselves. There is
no slot, no ack and no copy out on the receiving side: it reads each byte once to verify it and once to apply it.
Without a manifest (the engine's first sync) the slot ring of `ShmSender` runs and the receivers learn the layout.

The arena is staging like the slot ring's private buffers: nothing the caller holds changes before commit.
"""

from __future__ import annotations

import math
import os
import time
from typing import NamedTuple

import torch
import xxhash

from ring_ext_astate.arena import ALIGN, STEP
from ring_ext_astate.errors import SyncError
from ring_ext_astate.messages import ArenaOffer, Begin, Chunk, Report
from ring_ext_astate.segments import create_segment
from ring_ext_astate.shm_transport import Meta, ShmReceiver, ShmSender, SyncStats, _map_segment


def _nbytes(meta: Meta) -> int:
    return math.prod(meta[1]) * getattr(torch, meta[2]).itemsize


def arena_offsets(layout: tuple[Meta, ...]) -> tuple[dict[str, int], int]:
    """Each tensor's byte offset in an arena holding `layout`, and the arena's size."""
    offsets, size = {}, 0
    for meta in layout:
        offsets[meta[0]] = size
        size += -(-_nbytes(meta) // ALIGN) * ALIGN
    return offsets, size


class Arena:
    """A receiver's staging buffers in one shared-memory segment that the senders map and write into."""

    def __init__(self, layout: tuple[Meta, ...]) -> None:
        self.layout, self.version = layout, -1
        self.offsets, self.size = arena_offsets(layout)
        st = os.statvfs("/dev/shm")
        if self.size > st.f_bavail * st.f_frsize:  # a sparse segment beyond it would SIGBUS on a later write
            raise SyncError(f"/dev/shm has {st.f_bavail * st.f_frsize} bytes free, the staging arena needs "
                            f"{self.size}: enlarge /dev/shm (e.g. docker --shm-size) or use transport=dist")
        self.shm = create_segment(max(self.size, 1))  # unlinked by the next sync's creator if this process is killed
        self.name = self.shm.name
        self.shm.close()  # mapped below without exporting SharedMemory's own buffer, so `unlink` never blocks on it
        base = torch.frombuffer(_map_segment(self.name, max(self.size, 1), reserve=True), dtype=torch.uint8)
        self.views = {m: base[self.offsets[m[0]]:self.offsets[m[0]] + _nbytes(m)].view(getattr(torch, m[2])).view(m[1])
                      for m in layout}

    def unlink(self) -> None:
        self.views = {}  # the mapping goes with the last view on it
        self.shm.unlink()


class DirectShmSender(ShmSender):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.arena_maps: dict[str, torch.Tensor] = {}  # receivers' arenas, mapped once

    def _open_stream(self, version: int, manifest: list[Meta] | None, stats: SyncStats) -> None:
        super()._open_stream(version, manifest, stats)
        self.direct = manifest is not None
        if self.direct:
            tw = time.perf_counter()
            self.arenas = self._await_arenas(version)
            stats.seconds["wait"] += time.perf_counter() - tw
            self._hash, self._chunk, self._filled = xxhash.xxh3_64(), [], 0

    def _await_arenas(self, version: int) -> list[tuple[torch.Tensor, dict[str, int]]]:
        deadline, got = time.monotonic() + self.timeout_s, {}
        while len(got) < self.n_recv:
            msg = self.chan.recv(deadline)
            if msg is None:
                missing = sorted(set(range(self.n_recv)) - set(got))
                raise SyncError(f"sender {self.rank}: no staging arena from receiver(s) {missing} "
                                f"within {self.timeout_s}s")
            if msg.version != version:
                continue
            if isinstance(msg, Report):
                self._take_report(msg)
            if isinstance(msg, ArenaOffer):
                got[msg.rank] = msg
        names = {m.name for m in got.values()}
        self.arena_maps = {n: t for n, t in self.arena_maps.items() if n in names}  # replaced arenas are unmapped
        for offer in got.values():
            if offer.name not in self.arena_maps:
                self.arena_maps[offer.name] = torch.frombuffer(_map_segment(offer.name, max(offer.size, 1)),
                                                               dtype=torch.uint8)
        return [(self.arena_maps[got[r].name], got[r].offsets) for r in range(self.n_recv)]

    def _put(self, meta: Meta, src: torch.Tensor, a: int, b: int) -> None:
        if not self.direct:
            return super()._put(meta, src, a, b)
        name = meta[0]
        if any(name not in offsets for _, offsets in self.arenas):
            raise ValueError(f"tensor {name!r} is not in the manifest this sync began with")
        dsts = [arena[offsets[name]:offsets[name] + src.numel()] for arena, offsets in self.arenas]
        pos = a
        while pos < b:
            n = min(b - pos, STEP, self.slot_bytes - self._filled)
            piece = src[pos:pos + n]
            for dst in dsts:
                dst[pos:pos + n].copy_(piece)
            self._hash.update(memoryview(piece.numpy()))  # the source, still in cache after the copy
            if self._chunk and self._chunk[-1][0] == meta and self._chunk[-1][2] == pos:
                self._chunk[-1] = (meta, self._chunk[-1][1], pos + n)
            else:
                self._chunk.append((meta, pos, pos + n))
            self._filled, pos = self._filled + n, pos + n
            if self._filled == self.slot_bytes:
                self._announce()

    def _announce(self) -> None:
        """Tell every receiver which arena bytes are written, with their checksum; stop early if one failed."""
        self._broadcast(Chunk(self.rank, self._version, self._chunk, self._hash.intdigest()))
        self._stats.buckets += 1
        self._hash, self._chunk, self._filled = xxhash.xxh3_64(), [], 0
        while (msg := self.chan.recv(time.monotonic())) is not None:  # no wait: only what already arrived
            if isinstance(msg, Report) and msg.version == self._version:
                self._take_report(msg)

    def _end_stream(self) -> None:
        if not self.direct:
            return super()._end_stream()
        if self._chunk:
            self._announce()

    def close(self) -> None:
        super().close()
        self.arena_maps = {}


class DirectShmReceiver(ShmReceiver):
    def __init__(self, rank: int, timeout_s: float = 60.0) -> None:
        super().__init__(rank, timeout_s)
        self.arena: Arena | None = None

    def _handle(self, msg: NamedTuple, version: int, expected: dict[str, Meta] | None, staged: dict,
                ended: dict) -> None:
        if isinstance(msg, Chunk):
            return self._verify_chunk(msg, expected, staged)
        super()._handle(msg, version, expected, staged, ended)
        if isinstance(msg, Begin) and msg.manifest is not None:  # the manifest passed the layout checks
            self._offer_arena(msg.rank, version, tuple(msg.manifest))

    def _offer_arena(self, sender: int, version: int, layout: tuple[Meta, ...]) -> None:
        if self.arena is None or self.arena.layout != layout:
            if self.arena is not None and self.arena.version == version:
                raise self._fail(f"sender {sender}'s manifest differs from another sender's in sync {version}")
            self._drop_arena()
            try:
                self.arena = Arena(layout)
            except SyncError as e:
                raise self._fail(str(e)) from None
            self.pool = dict(self.arena.views)  # staging buffers are the arena's from now on
        self.arena.version = version
        self.chan.send(sender, ArenaOffer(self.rank, version, self.arena.name, self.arena.size, self.arena.offsets))

    def _verify_chunk(self, msg: Chunk, expected: dict[str, Meta] | None, staged: dict) -> None:
        sender, extents, checksum = msg.rank, msg.extents, msg.checksum
        h = xxhash.xxh3_64()
        for meta, a, b in extents:
            dst = self._check(meta, sender, expected, staged)
            if self.arena is None or self.arena.views.get(meta) is not dst:
                raise self._fail(f"tensor {meta[0]!r} from sender {sender} is not in the staging arena")
            h.update(memoryview(dst.view(-1).view(torch.uint8)[a:b].numpy()))
            staged[meta[0]][2].append((a, b, sender))
        if h.intdigest() != checksum:
            raise self._fail(f"checksum mismatch in a bucket from sender {sender} "
                             f"carrying {sorted({e[0][0] for e in extents})}")

    def _drop_arena(self) -> None:
        if self.arena is not None:
            self.arena.unlink()
            self.arena, self.pool = None, {}

    def close(self) -> None:
        super().close()
        self._drop_arena()


__all__ = ["Arena", "DirectShmReceiver", "DirectShmSender", "SyncError", "arena_offsets"]

"""In-place weight sync, both ends of one sync: a sender writes its slices into a worker's parameters, the worker
checks the reports before it commits. No verl, no vLLM.

A sync of version v: the sender writes each checkpoint tensor's recorded slices straight into the worker's
parameter arena (`replay` the view ops on the sender's own device, then one copy per step of `STEP` bytes), and
reports the byte ranges it wrote; on a verified sync it also compares each step's destination bytes with the
source while both are in cache and sends the destination's xxh3 per step. The worker (`check_reports`) commits v
only if the plan digests agree, v is the next version, the ranges cover every planned byte exactly once and, on a
verified sync, the bytes it holds still hash as the sender saw them. Writes are idempotent overwrites: a failed
sync is retried whole.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import xxhash

from ring_ext_astate.arena import STEP, map_arena
from ring_ext_astate.control import ControlClient
from ring_ext_astate.errors import SyncError
from ring_ext_astate.kernel_layout import copy_words, equal_bytes
from ring_ext_astate.plan import Destination, Plan, PlanError, merge_exactly_once, replay


@dataclass
class Welcome:
    """What a proven sender learns from the worker."""

    rank: int
    arenas: tuple[str, ...]  # one, or two with shadow: sync v writes arenas[v % len]
    size: int
    plan: Plan
    ignored: frozenset[str]  # checkpoint names vLLM's loader reads but writes nowhere (tied heads, rotary caches)
    version: int  # the last committed version


@dataclass
class WriteStats:
    bytes: int = 0
    seconds: float = 0.0
    verified: bool = False
    ranges: list[tuple[int, int]] = field(default_factory=list)
    digests: list[tuple[int, int, int]] = field(default_factory=list)


class InPlaceSender:
    """A trainer-side writer into one rollout worker's parameters (the mapping is kept across syncs)."""

    def __init__(self, descriptor: str, timeout_s: float) -> None:
        self.client = ControlClient(descriptor, timeout_s)
        self.welcome: Welcome = self.client.hello()
        self.maps = [map_arena(name, self.welcome.size) for name in self.welcome.arenas]
        self._dsts: dict[tuple, torch.Tensor] = {}  # (arena, offset, shape) -> the destination's view
        self._views: dict[tuple, tuple] = {}  # (offset, source layout) -> the source slice's size, stride, offset

    def target(self, version: int) -> torch.Tensor:
        """The arena sync `version` writes (the inactive one, with shadow)."""
        return self.maps[version % len(self.maps)]

    def write(self, weights: Iterable[tuple[str, torch.Tensor]], version: int, verify: bool,
              share: frozenset[tuple[str, int]] | None = None) -> WriteStats:
        """Write the planned slices of `weights` (with `share`, only those destinations: one of several senders)."""
        return write_workers([self], weights, version, verify, [share])[0]

    def _begin(self, version: int) -> None:
        self.bytes = self.target(version)
        self.seen: set[str] = set()

    def _put(self, name: str, t: torch.Tensor, stats: WriteStats, verify: bool,
             share: frozenset[tuple[str, int]] | None) -> None:
        ds = self.welcome.plan.destinations.get(name)
        if ds is None:
            if name in self.welcome.ignored:
                return
            # not in the checkpoint the plan came from (a tied head HF's state dict still holds): the worker's
            # loaders say whether they ignore it; anything they would write is refused there, naming it
            if self.client.ignores(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")):
                self.welcome.ignored = self.welcome.ignored | {name}
                return
        self.seen.add(name)
        for i, d in enumerate(ds):
            if share is None or (name, i) in share:
                self._write_one(name, t, d, stats, verify)

    def _end(self, share: frozenset[tuple[str, int]] | None) -> None:
        wanted = set(self.welcome.plan.destinations) if share is None else {n for n, _ in share}
        missing = sorted(wanted - self.seen)
        if missing:
            raise SyncError(f"the trainer sent no {missing[:5]}{'...' if len(missing) > 5 else ''} "
                            f"({len(missing)} tensors rollout worker {self.welcome.rank} needs)")

    def _source(self, name: str, t: torch.Tensor, d: Destination) -> torch.Tensor:
        """`source_slice`, replayed once per destination and source layout: later syncs take the same view of the
        new tensor in one `as_strided` (a chain of views per slice costs more than a small slice's copy)."""
        key = (d.offset, tuple(t.shape), t.stride(), t.dtype, t.device)
        seen = self._views.get(key)
        if seen is not None:
            return t.as_strided(seen[0], seen[1], t.storage_offset() + seen[2])
        src = source_slice(name, t, d)
        if src.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():  # a view, not a copy the chain made
            self._views[key] = (tuple(src.shape), src.stride(), src.storage_offset() - t.storage_offset())
        return src

    def _write_one(self, name: str, t: torch.Tensor, d: Destination, stats: WriteStats, verify: bool) -> None:
        src = self._source(name, t, d)
        key = (self.bytes.data_ptr(), d.offset, d.shape)
        dst = self._dsts.get(key)
        if dst is None:  # the views into the arena are made once per arena (hundreds of slices, each sync)
            dst = self._dsts[key] = self.bytes[d.offset:d.offset + d.nbytes].view(getattr(torch, d.dtype)).view(d.shape)
        stats.ranges.append((d.offset, d.offset + d.nbytes))
        stats.bytes += d.nbytes
        if not verify:  # one copy per slice: stepping only pays where each step is hashed while in cache
            copy_words(dst, src)
            return
        if src.is_contiguous():
            src, dst = src.reshape(-1), dst.reshape(-1)
        per = max(1, STEP // (d.itemsize * (dst[0].numel() if dst.dim() else 1)))  # along the first dim
        for a in range(0, dst.shape[0], per):  # compared and hashed while both are in cache: no second pass
            s, o = src[a:a + per], dst[a:a + per]
            copy_words(o, s)
            h = xxhash.xxh3_64_intdigest(memoryview(o.reshape(-1).view(torch.uint8).numpy()))
            if s.dtype != o.dtype or s.device.type != "cpu":
                same = False
            elif s.is_contiguous():
                same = h == xxhash.xxh3_64_intdigest(memoryview(s.view(torch.uint8).numpy()))
            else:  # a strided source (a TP slice, a kernel's layout): compared where it lies, no contiguous copy
                same = equal_bytes(o, s)
            if not same and not torch.equal(o, s.to(o.dtype).cpu()):  # a cast copy: compare values instead
                raise SyncError(f"{name!r}: bytes written into {d.param!r} differ from the source")
            lo = d.offset + (o.data_ptr() - dst.data_ptr())
            stats.digests.append((lo, lo + o.numel() * d.itemsize, h))

    def report(self, version: int, sender: int, stats: WriteStats) -> None:
        self.client.report({"version": version, "sender": sender, "plan": self.welcome.plan.digest,
                            "ranges": stats.ranges, "digests": stats.digests if stats.verified else None})

    def close(self) -> None:
        self.client.close()
        self.maps, self.bytes, self._dsts, self._views = [], None, {}, {}  # unmapped with the last reference


def write_workers(senders: list[InPlaceSender], weights: Iterable[tuple[str, torch.Tensor]], version: int,
                  verify: bool, shares: list[frozenset[tuple[str, int]] | None]) -> list[WriteStats]:
    """One pass over `weights` writes every worker: a trainer's tensors are produced once (FSDP gathers each as it
    is asked for), each written into every worker's parameters before the next is produced."""
    stats = [WriteStats(verified=verify) for _ in senders]
    t0 = time.perf_counter()
    for s in senders:
        s._begin(version)
    for name, t in weights:
        for s, st, share in zip(senders, stats, shares):
            s._put(name, t, st, verify, share)
    for s, st, share in zip(senders, stats, shares):
        s._end(share)
        st.seconds = time.perf_counter() - t0
    return stats


def source_slice(name: str, t: torch.Tensor, d: Destination) -> torch.Tensor:
    """The elements of checkpoint tensor `t` that destination `d` holds, in `d`'s shape: the recorded views replayed,
    a view of `t` where they allow (a TP slice along an inner dim, a kernel layout's permute), so that the one copy
    is the one into the destination."""
    src = replay(t, d.ops)
    if tuple(src.shape) != d.shape:
        if src.numel() != d.nbytes // d.itemsize:
            raise PlanError(f"{name!r}: the recorded slice has shape {d.shape}, the sender's is {tuple(src.shape)}")
        src = src.reshape(d.shape)
    return src


def check_reports(plan: Plan, reports: list[dict], version: int, arena: torch.Tensor, verify: bool, rank: int) -> int:
    """The worker's commit check; returns the bytes written. Raises SyncError naming what is wrong."""
    for r in reports:
        if r["plan"] != plan.digest:
            raise SyncError(f"rollout worker {rank}: sender {r['sender']} wrote with plan {r['plan']}, the worker's is "
                            f"{plan.digest}")
        if r["version"] != version:
            raise SyncError(f"rollout worker {rank}: sender {r['sender']} reported version {r['version']}, "
                            f"expected {version}")
    try:
        got = merge_exactly_once((a, b, f"sender {r['sender']}") for r in reports for a, b in r["ranges"])
    except PlanError as e:
        raise SyncError(f"rollout worker {rank}, sync {version}: {e}") from None
    want = merge_exactly_once((d.offset, d.offset + d.nbytes, n) for n, ds in plan.destinations.items() for d in ds)
    if got != want:
        raise SyncError(f"rollout worker {rank}, sync {version}: the senders wrote {sum(b - a for a, b in got)} of "
                        f"{sum(b - a for a, b in want)} planned bytes")
    if verify:
        for r in reports:
            if r["digests"] is None:
                raise SyncError(f"rollout worker {rank}: sync {version} is verified but sender {r['sender']} sent "
                                "no digests")
            for a, b, h in r["digests"]:
                if xxhash.xxh3_64_intdigest(memoryview(arena[a:b].numpy())) != h:
                    raise SyncError(f"rollout worker {rank}, sync {version}: bytes [{a}, {b}) changed after sender "
                                    f"{r['sender']} wrote them (in {_param_at(plan, a)!r})")
    return sum(b - a for a, b in got)


def _param_at(plan: Plan, offset: int) -> str:
    for name, (o, n) in plan.params.items():
        if o <= offset < o + n:
            return name
    return "?"

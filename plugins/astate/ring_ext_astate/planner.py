"""Transfer planner of the AState-like weight sync (Ring-1T §2.5): pure Python, no torch, no verl.

Data flow: trainer shard metadata (`TrainerLayout`) + rollout destination layouts (`RolloutLayout`)
-> `plan_transfers` -> `TransferPlan` (point-to-point `Transfer`s grouped into per-(sender, receiver)
`Bucket`s) -> transports that move each bucket's bytes trainer rank -> rollout rank (later) -> the verl
checkpoint engine ``astate`` (later). The plan is computed once from metadata and reused through
`PlanCache` while the layouts (and so their digest) do not change. Builders for FSDP, Megatron and
vLLM layouts live in `ring_ext_astate.layouts`.

Every tensor is addressed by its row-major flattened element index space [0, numel); regions are
half-open element intervals. Guarantees: every destination element is received exactly once, from a
trainer rank that owns it (zero redundancy, no rank-0 funnel); among replicas the least-loaded sender
(by bytes, ties -> lowest rank) is picked per bucket-sized chunk; all checks run before planning.
Destinations keep the source dtype (no casting is planned here).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


class LayoutError(ValueError):
    """The trainer/rollout layouts are inconsistent (the message names the tensor and rank)."""


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    itemsize: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True)
class Interval:
    start: int
    stop: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop:
            raise LayoutError(f"bad interval [{self.start}, {self.stop}): need 0 <= start < stop")

    @property
    def size(self) -> int:
        return self.stop - self.start


TrainerLayout = dict[int, dict[str, list[Interval]]]  # trainer rank -> tensor -> owned intervals


@dataclass(frozen=True)
class Piece:
    dst_offset: int  # copy `src` elements of `src_tensor` into the destination at dst_offset
    src_tensor: str
    src: Interval


def _check_tiling(dest: DestTensor, where: str = "") -> None:
    pos = 0
    for p in sorted(dest.pieces, key=lambda p: p.dst_offset):
        if p.dst_offset != pos:
            kind = "gap" if p.dst_offset > pos else "overlap"
            raise LayoutError(f"dest tensor {dest.name!r}{where}: {kind} at {pos} in tiling of [0, {dest.numel})")
        pos += p.src.size
    if pos != dest.numel:
        raise LayoutError(f"dest tensor {dest.name!r}{where}: pieces cover [0, {pos}), expected [0, {dest.numel})")


@dataclass(frozen=True)
class DestTensor:
    name: str
    numel: int
    pieces: tuple[Piece, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "pieces", tuple(self.pieces))
        _check_tiling(self)


RolloutLayout = dict[int, list[DestTensor]]  # rollout rank -> its destination tensors


@dataclass(frozen=True)
class Transfer:
    src_rank: int
    dst_rank: int
    src_tensor: str
    src: Interval
    dst_tensor: str
    dst_offset: int
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    src_rank: int
    dst_rank: int
    transfers: tuple[Transfer, ...]
    nbytes: int


@dataclass(frozen=True)
class TransferPlan:
    transfers: tuple[Transfer, ...]  # all transfers, in bucket order
    buckets: tuple[Bucket, ...]  # sorted by (src_rank, dst_rank), then sequence
    layout_digest: str

    def bytes_per_sender(self) -> dict[int, int]:
        return _sum_by(self.transfers, "src_rank")

    def bytes_per_receiver(self) -> dict[int, int]:
        return _sum_by(self.transfers, "dst_rank")


def _sum_by(transfers: Sequence[Transfer], attr: str) -> dict[int, int]:
    out: Counter[int] = Counter()
    for t in transfers:
        out[getattr(t, attr)] += t.nbytes
    return dict(sorted(out.items()))


def layout_digest(tensors: Sequence[TensorMeta], trainer: TrainerLayout, rollout: RolloutLayout,
                  bucket_bytes: int) -> str:
    """Stable sha256 of everything the plan depends on (dict orders and trainer interval order ignored)."""
    doc = {
        "v": 1, "bucket_bytes": bucket_bytes, "tensors": sorted([t.name, list(t.shape), t.itemsize] for t in tensors),
        "trainer": [[r, [[n, sorted([iv.start, iv.stop] for iv in ivs)] for n, ivs in sorted(trainer[r].items())]]
                    for r in sorted(trainer)],
        "rollout": [[r, [[d.name, d.numel, [[p.dst_offset, p.src_tensor, p.src.start, p.src.stop] for p in d.pieces]]
                         for d in rollout[r]]] for r in sorted(rollout)],
    }
    return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()


Segment = tuple[int, int, tuple[int, ...]]  # [start, stop) with a constant, non-empty owner set


def _segments(metas: dict[str, TensorMeta], trainer: TrainerLayout) -> dict[str, list[Segment]]:
    events: dict[str, list[tuple[int, int, int]]] = {n: [] for n in metas}
    for rank in sorted(trainer):
        for name, ivs in sorted(trainer[rank].items()):
            if name not in metas:
                raise LayoutError(f"tensor {name!r} on trainer rank {rank}: unknown tensor")
            for iv in ivs:
                if iv.stop > metas[name].numel:
                    raise LayoutError(f"tensor {name!r} on trainer rank {rank}: interval [{iv.start}, {iv.stop}) "
                                      f"outside [0, {metas[name].numel})")
                events[name] += [(iv.start, 1, rank), (iv.stop, -1, rank)]
    segs: dict[str, list[Segment]] = {}
    for name, ev in events.items():
        ev.sort()
        active: dict[int, int] = {}
        segs[name] = []
        for i, (pos, delta, rank) in enumerate(ev):
            active[rank] = active.get(rank, 0) + delta
            if not active[rank]:
                del active[rank]
            nxt = ev[i + 1][0] if i + 1 < len(ev) else pos
            if nxt > pos and active:
                segs[name].append((pos, nxt, tuple(sorted(active))))
    return segs


def _walk(segs: list[Segment], a: int, b: int) -> Iterator[Segment]:
    """[a, b) cut at ownership changes; unowned stretches come with owners ()."""
    i, pos = max(bisect.bisect_right(segs, (a, math.inf)) - 1, 0), a
    while pos < b:
        if i < len(segs) and segs[i][1] <= pos:
            i += 1
        elif i < len(segs) and segs[i][0] <= pos:
            stop = min(segs[i][1], b)
            yield pos, stop, segs[i][2]
            pos, i = stop, i + 1
        else:
            stop = min(segs[i][0], b) if i < len(segs) else b
            yield pos, stop, ()
            pos = stop


def _validate(tensors: Sequence[TensorMeta], trainer: TrainerLayout, rollout: RolloutLayout,
              bucket_bytes: int) -> tuple[dict[str, TensorMeta], dict[str, list[Segment]]]:
    metas = {t.name: t for t in tensors}
    if len(metas) != len(tensors):
        raise LayoutError("duplicate tensor names in `tensors`")
    if bucket_bytes < max((t.itemsize for t in tensors), default=1):
        raise ValueError(f"bucket_bytes={bucket_bytes} is smaller than one element")
    segs = _segments(metas, trainer)
    for rank in sorted(rollout):
        seen: set[str] = set()
        for d in rollout[rank]:
            if d.name in seen:
                raise LayoutError(f"dest tensor {d.name!r} appears twice on rollout rank {rank}")
            seen.add(d.name)
            _check_tiling(d, f" on rollout rank {rank}")  # again: unpickled layouts skip __post_init__
            for p in d.pieces:
                where = f"tensor {p.src_tensor!r} (for {d.name!r}) on rollout rank {rank}"
                meta = metas.get(p.src_tensor)
                if meta is None:
                    raise LayoutError(f"{where}: unknown tensor")
                if p.src.stop > meta.numel:
                    raise LayoutError(f"{where}: [{p.src.start}, {p.src.stop}) outside [0, {meta.numel})")
                if meta.itemsize != metas[d.pieces[0].src_tensor].itemsize:
                    raise LayoutError(f"{where}: itemsize differs from the other pieces of {d.name!r}")
                for s, e, owners in _walk(segs[p.src_tensor], p.src.start, p.src.stop):
                    if not owners:
                        raise LayoutError(f"{where}: elements [{s}, {e}) are owned by no trainer rank")
    return metas, segs


def _split(t: Transfer, bucket_bytes: int) -> Iterator[Transfer]:
    itemsize = t.nbytes // t.src.size
    step = bucket_bytes // itemsize
    for s in range(t.src.start, t.src.stop, step):
        e = min(s + step, t.src.stop)
        yield Transfer(t.src_rank, t.dst_rank, t.src_tensor, Interval(s, e), t.dst_tensor,
                       t.dst_offset + s - t.src.start, (e - s) * itemsize)


def plan_transfers(tensors: Sequence[TensorMeta], trainer: TrainerLayout, rollout: RolloutLayout, *,
                   bucket_bytes: int) -> TransferPlan:
    """Zero-redundancy plan; raises LayoutError (naming tensor and rank) before planning anything."""
    metas, segs = _validate(tensors, trainer, rollout, bucket_bytes)
    load = {r: 0 for r in trainer}
    raw: dict[tuple[int, int], list[Transfer]] = {}
    for dst in sorted(rollout):
        for d in rollout[dst]:
            for p in d.pieces:
                itemsize = metas[p.src_tensor].itemsize
                for s, e, owners in _walk(segs[p.src_tensor], p.src.start, p.src.stop):
                    step = e - s if len(owners) == 1 else bucket_bytes // itemsize
                    for cs in range(s, e, step):
                        ce = min(cs + step, e)
                        src = min(owners, key=lambda r: (load[r], r))
                        load[src] += (ce - cs) * itemsize
                        off = p.dst_offset + cs - p.src.start
                        lst = raw.setdefault((src, dst), [])
                        prev = lst[-1] if lst else None
                        if (prev and prev.src_tensor == p.src_tensor and prev.src.stop == cs  # contiguous: merge
                                and prev.dst_tensor == d.name and prev.dst_offset + prev.src.size == off):
                            lst[-1] = Transfer(src, dst, p.src_tensor, Interval(prev.src.start, ce), d.name,
                                               prev.dst_offset, prev.nbytes + (ce - cs) * itemsize)
                        else:
                            lst.append(Transfer(src, dst, p.src_tensor, Interval(cs, ce), d.name, off,
                                                (ce - cs) * itemsize))
    buckets: list[Bucket] = []
    for (src, dst), ts in sorted(raw.items()):  # next-fit packing, in planning order
        groups: list[list[Transfer]] = [[]]
        used = 0
        for part in (q for t in ts for q in _split(t, bucket_bytes)):
            if groups[-1] and used + part.nbytes > bucket_bytes:
                groups, used = [*groups, []], 0
            groups[-1].append(part)
            used += part.nbytes
        buckets += [Bucket(src, dst, tuple(g), sum(t.nbytes for t in g)) for g in groups]
    return TransferPlan(tuple(t for b in buckets for t in b.transfers), tuple(buckets),
                        layout_digest(tensors, trainer, rollout, bucket_bytes))


class PlanCache:
    """Keeps the last plan; recomputes only when the layout digest changes (`computed` counts plans)."""

    def __init__(self) -> None:
        self._plan: TransferPlan | None = None
        self.computed = 0

    def get(self, tensors: Sequence[TensorMeta], trainer: TrainerLayout, rollout: RolloutLayout,
            bucket_bytes: int) -> TransferPlan:
        if self._plan is None or self._plan.layout_digest != layout_digest(tensors, trainer, rollout, bucket_bytes):
            self._plan = plan_transfers(tensors, trainer, rollout, bucket_bytes=bucket_bytes)
            self.computed += 1
        return self._plan

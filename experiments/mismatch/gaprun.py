"""One GRPO run whose rollout copy is re-derived from the current weights (`copies.RolloutCopy`), issue 18.

Same real parts as `grpo.GRPORun` (verl's ActorConfig from `+recipe=ring1t`, the loss from verl's
registry, verl's GRPO advantages, rollout log-probs handed over with `rollout_logprobs_context`), plus: a
filtered prompt pool, AdamW without weight decay, optional routing replay (the trainer uses the copy's
expert choices), and the issue's per-step measurements (both tails of k, router flips, router grad norm,
weight norms).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from experiments.mismatch.copies import RolloutCopy, RouteRecorder, routers
from experiments.mismatch.grpo import GRPORun, actor_config
from experiments.mismatch.policy import Batch, entropy, exact_kl, left_pad, prompt_ids, score
from ring_ext.tiny.reward import compute_score

STEP_METRICS = (
    "reward",
    "acc",
    "resp_len",
    "grad_norm",
    "grad_norm_router",
    "kl_mean",
    "kl_max",
    "abs_dlogp",
    "k_lt_0.5",
    "k_gt_2",
    "k_gt_5",
    "oob_frac",
    "masked_frac",
    "masked_entropy",
    "entropy",
    "logp_mean",
    "router_flips",
    "weight_norm",
    "weight_absmax",
    "clipfrac",
)


@dataclass(frozen=True)
class GapConfig:
    prompts: int = 8  # prompts per step
    group: int = 8  # samples per prompt
    max_new: int = 20  # the longest correct answer is 14 tokens + EOS
    lr: float = 1e-3
    mini_batches: int = 2  # optimizer steps per rollout batch (the PPO ratio and clip are exercised)
    temperature: float = 1.0
    mode: str = "bf16"  # rollout copy: fp32 | bf16 | fp8
    replay: bool = False  # routing replay: the trainer routes each token to the copy's experts


def _replay_router_forward(self: Any, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """transformers' Qwen3MoeTopKRouter.forward; where `self.replay` names experts, those replace the top-k
    (their weights still come from this router's own softmax, so the gate keeps its gradient)."""
    hidden = hidden.reshape(-1, self.hidden_dim)
    logits = F.linear(hidden, self.weight)
    probs = F.softmax(logits, dtype=torch.float, dim=-1)
    top_value, top_index = torch.topk(probs, self.top_k, dim=-1)
    if getattr(self, "replay", None) is not None:
        forced = self.replay.reshape(-1, self.top_k)
        top_index = torch.where(forced[:, :1] >= 0, forced, top_index)
        top_value = probs.gather(-1, top_index)
    if self.norm_topk_prob:
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
    return logits, top_value.to(logits.dtype), top_index


@contextmanager
def replaying(
    model: Any, routes: list[torch.Tensor] | None, rows: torch.Tensor | None = None
) -> Iterator[None]:
    rs = routers(model)
    for r, route in zip(rs, routes or [None] * len(rs), strict=True):
        r.replay = None if route is None else (route if rows is None else route[rows])
    try:
        yield
    finally:
        for r in rs:
            r.replay = None


def router_flips(copy_routes: list[torch.Tensor], train_calls: list[Any], mask: torch.Tensor) -> float:
    """Fraction of (real token, MoE layer) whose top-k expert set differs between copy and trainer."""
    flips, n = 0.0, 0.0
    for route, calls in zip(copy_routes, train_calls, strict=True):
        mine = calls[-1][1].reshape(route.shape)
        ok = mask.bool() & (route[..., 0] >= 0)
        differ = (route.sort(-1).values != mine.sort(-1).values).any(-1)
        flips, n = flips + float(differ[ok].sum()), n + float(ok.sum())
    return flips / max(n, 1.0)


class GapRun(GRPORun):
    def __init__(self, model: Any, tok: Any, spec: str, seed: int, cfg: GapConfig, pool: list[dict]) -> None:
        from verl.trainer.ppo.core_algos import get_policy_loss_fn

        from ring_ext.discovery import load_plugins

        load_plugins()  # registers icepop/kpop/tis in verl's registry
        self.model, self.tok, self.spec, self.seed, self.cfg, self.pool = model, tok, spec, seed, cfg, pool
        self.actor = actor_config(spec)
        self.actor.global_batch_info.clear()  # single process: local token-mean per mini-batch, as dp_size=1
        self.mode = self.actor.policy_loss.loss_mode
        self.loss_fn = get_policy_loss_fn(self.mode)
        self.engine = RolloutCopy(model, cfg.mode)
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
        self.gen = torch.Generator().manual_seed(seed)
        self.eos, self.pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
        for r in routers(model):
            r.replay = None
            r.forward = _replay_router_forward.__get__(r)  # identical to the original while replay is None

    def describe(self) -> str:
        return super().describe().replace(str(asdict(self.cfg)), f"{asdict(self.cfg)} pool={len(self.pool)}")

    def step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        rows = random.Random(self.seed * 1_000_003 + step).sample(self.pool, cfg.prompts)
        rows = [r for r in rows for _ in range(cfg.group)]
        ids, mask = left_pad([prompt_ids(self.tok, r) for r in rows], self.pad)
        self.engine.sync(self.model)
        ro = self.engine.rollout(ids, mask, cfg.max_new, self.eos, self.pad, self.gen, cfg.temperature)
        batch, resp = ro.batch, ro.batch.response_mask
        scores = [
            compute_score(
                "ring_ext/arith",
                self.tok.decode(batch.responses[i][resp[i]].tolist(), skip_special_tokens=True),
                r["reward_model"]["ground_truth"],
            )
            for i, r in enumerate(rows)
        ]
        routes = ro.routes if cfg.replay else None
        rec = RouteRecorder(self.model)
        with torch.no_grad(), replaying(self.model, routes):
            old_logp, train_all = score(self.model, batch, full=True)
        rec.remove()
        ent, kl = entropy(train_all), exact_kl(ro.logp_all, train_all)
        del train_all
        out = self._diagnostics(old_logp, ro.logp, resp, ent, kl)
        k = (old_logp - ro.logp).exp()[resp]
        out |= {
            "k_lt_0.5": float((k < 0.5).float().mean()),
            "k_gt_2": float((k > 2).float().mean()),
            "k_gt_5": float((k > 5).float().mean()),
            "abs_dlogp": float((old_logp - ro.logp).abs()[resp].mean()),
            "router_flips": router_flips(ro.routes, rec.calls, batch.attention_mask),
        }
        out |= self._update_replay(batch, old_logp, ro.logp, ent, self._advantages(scores, resp), routes)
        with torch.no_grad():
            flat = torch.cat([p.detach().flatten() for p in self.model.parameters()])
        out |= {
            "reward": float(np.mean([s["score"] for s in scores])),
            "acc": float(np.mean([s["acc"] for s in scores])),
            "resp_len": resp.sum(-1).float().mean().item(),
            "weight_norm": float(flat.norm()),
            "weight_absmax": float(flat.abs().max()),
        }
        return {key: out[key] for key in STEP_METRICS}

    def _update_replay(
        self,
        batch: Batch,
        old: torch.Tensor,
        infer: torch.Tensor,
        ent: torch.Tensor,
        adv: torch.Tensor,
        routes: list[torch.Tensor] | None,
    ) -> dict[str, float]:
        from ring_ext_icepop.loss import rollout_logprobs_context

        perm = torch.randperm(old.shape[0], generator=self.gen)
        gates = [r.weight for r in routers(self.model)]
        norms, rnorms, clip, masked, masked_ent, tokens = [], [], 0.0, 0.0, 0.0, 0.0
        for idx in perm.chunk(self.cfg.mini_batches):
            sub = Batch(batch.input_ids[idx], batch.attention_mask[idx], batch.prompt_len)
            resp = sub.response_mask
            with replaying(self.model, routes, idx):
                logp, _ = score(self.model, sub)
            kwargs = {
                "old_log_prob": old[idx],
                "log_prob": logp,
                "advantages": adv[idx],
                "response_mask": resp,
                "loss_agg_mode": self.actor.loss_agg_mode,
                "config": self.actor,
            }
            if self.mode == "vanilla":
                loss, metrics = self.loss_fn(**kwargs)
            else:
                with rollout_logprobs_context(infer[idx], ent[idx]):
                    loss, metrics = self.loss_fn(**kwargs)
            self.opt.zero_grad()
            loss.backward()
            rnorms.append(float(torch.linalg.vector_norm(torch.stack([g.grad.norm() for g in gates]))))
            norms.append(float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.actor.grad_clip)))
            self.opt.step()
            n = float(resp.sum())
            drop = sum(float(metrics.get(f"mismatch/masked_{side}_frac", 0.0)) for side in ("below", "above"))
            tokens, clip = tokens + n, clip + n * float(metrics["actor/pg_clipfrac"])
            masked += n * drop
            masked_ent += n * drop * float(metrics.get("mismatch/masked_entropy_mean", 0.0))
        return {
            "grad_norm": float(np.mean(norms)),  # pre-clip total norm, as verl logs actor/grad_norm
            "grad_norm_router": float(np.mean(rnorms)),  # pre-clip norm of the router gates' gradient
            "clipfrac": clip / max(tokens, 1.0),
            "masked_frac": masked / max(tokens, 1.0),
            "masked_entropy": masked_ent / masked if masked else 0.0,
        }

"""One GRPO run: rollout on the mismatched copy, fp32 recomputation, ring-ext's losses through verl's registry.

The loss is `verl.trainer.ppo.core_algos.get_policy_loss_fn(loss_mode)` with verl's own `ActorConfig` composed by
Hydra from `+recipe=ring1t` (clip ratios, grad clip, loss_agg_mode, and the typed IcePop/KPop/TIS knobs). The
rollout log-probs reach the icepop/kpop/tis losses through `rollout_logprobs_context`, the same hand-over verl's
patched call site does. Advantages are verl's `compute_grpo_outcome_advantage`.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from experiments.mismatch.engine import InferenceEngine
from experiments.mismatch.policy import TRAIN_ROWS, Batch, entropy, exact_kl, left_pad, prompt_ids, score
from ring_ext.tiny.reward import compute_score

TYPED = "actor_rollout_ref.actor.policy_loss._target_=ring_ext_icepop.config.MismatchPolicyLossConfig"
KNOBS = {"icepop": ("icepop_alpha", "icepop_beta"), "kpop": ("kpop_phi",), "tis": ("tis_cap",), "vanilla": ()}
METRICS = (
    "reward", "acc", "grad_norm", "kl_mean", "kl_max", "k3_mean", "masked_frac", "masked_entropy",
    "oob_frac", "oob_entropy", "entropy", "logp_mean", "clipfrac", "resp_len",
)  # fmt: skip


@dataclass(frozen=True)
class GRPOConfig:
    prompts: int = 8  # prompts per step
    group: int = 4  # samples per prompt (GRPO group)
    max_new: int = 20  # max response tokens (the longest correct answer is 14 + EOS)
    lr: float = 1e-4
    mini_batches: int = 2  # optimizer steps per rollout batch (so the PPO ratio/clip is exercised)
    temperature: float = 1.0
    mismatch: float = 0.0
    infer_dtype: str = "bfloat16"


def parse_method(spec: str) -> tuple[str, dict[str, float]]:
    """'vanilla' | 'tis[:cap]' | 'icepop[:alpha:beta]' | 'kpop[:phi]' -> (verl loss_mode, knob overrides)."""
    mode, *values = spec.split(":")
    if mode not in KNOBS or len(values) not in (0, len(KNOBS[mode])):
        raise ValueError(f"bad method {spec!r}: use vanilla, tis[:cap], icepop[:alpha:beta] or kpop[:phi]")
    return mode, {k: float(v) for k, v in zip(KNOBS[mode], values)}


def actor_config(spec: str) -> Any:
    """verl's ActorConfig for the method, composed the way verl's trainer composes it."""
    from verl.utils.config import omega_conf_to_dataclass

    from ring_ext.verl_config import compose_verl

    mode, knobs = parse_method(spec)
    overrides = ["+recipe=ring1t", "ring1t_loop=grpo", f"actor_rollout_ref.actor.policy_loss.loss_mode={mode}"]
    if mode != "vanilla":  # the typed config declares the knobs (verl refuses unknown keys otherwise)
        overrides += [TYPED, *(f"+actor_rollout_ref.actor.policy_loss.{k}={v}" for k, v in knobs.items())]
    actor = omega_conf_to_dataclass(compose_verl(overrides).actor_rollout_ref.actor)
    for key, value in knobs.items():  # fail loudly if a knob did not land (a silent vanilla run is the worst bug)
        assert math.isclose(getattr(actor.policy_loss, key), value), (key, actor.policy_loss)
    return actor


class GRPORun:
    def __init__(self, model: Any, tok: Any, spec: str, seed: int, cfg: GRPOConfig) -> None:
        from verl.trainer.ppo.core_algos import get_policy_loss_fn

        from ring_ext.discovery import load_plugins

        load_plugins()  # registers icepop/kpop/tis in verl's registry
        self.model, self.tok, self.spec, self.seed, self.cfg = model, tok, spec, seed, cfg
        self.actor = actor_config(spec)
        self.actor.global_batch_info.clear()  # single process: local token-mean per mini-batch, as dp_size=1
        self.mode = self.actor.policy_loss.loss_mode
        self.loss_fn = get_policy_loss_fn(self.mode)
        self.engine = InferenceEngine(model, cfg.mismatch, getattr(torch, cfg.infer_dtype))
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.01)
        self.gen = torch.Generator().manual_seed(seed)
        self.eos, self.pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id

    def describe(self) -> str:
        """The loss verl's registry returned and the knobs the loss will actually use (as the loss reads them)."""
        from ring_ext_icepop.config import variant_from_config
        from ring_ext_icepop.variants import describe

        knobs = ""
        if self.mode != "vanilla":
            knobs = " " + describe(variant_from_config(self.mode, self.actor.policy_loss))
        agg = self.actor.loss_agg_mode
        return f"{self.spec}: verl loss {self.loss_fn.__name__}{knobs} agg={agg} {asdict(self.cfg)}"

    def step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        rows = random.Random(self.seed * 1_000_003 + step).sample(TRAIN_ROWS, cfg.prompts)
        rows = [r for r in rows for _ in range(cfg.group)]
        ids, mask = left_pad([prompt_ids(self.tok, r) for r in rows], self.pad)
        self.engine.sync(self.model)
        batch, infer_logp, infer_all = self.engine.rollout(
            ids, mask, cfg.max_new, self.eos, self.pad, self.gen, cfg.temperature
        )
        resp = batch.response_mask
        scores = [
            compute_score("ring_ext/arith", self.tok.decode(batch.responses[i][resp[i]].tolist(),
                          skip_special_tokens=True), r["reward_model"]["ground_truth"])
            for i, r in enumerate(rows)
        ]  # fmt: skip
        with torch.no_grad():
            old_logp, train_all = score(self.model, batch, full=True)
        ent, kl = entropy(train_all), exact_kl(infer_all, train_all)
        del train_all, infer_all
        out = self._diagnostics(old_logp, infer_logp, resp, ent, kl)
        out |= self._update(batch, old_logp, infer_logp, ent, self._advantages(scores, resp))
        out |= {
            "reward": float(np.mean([s["score"] for s in scores])),
            "acc": float(np.mean([s["acc"] for s in scores])),
            "resp_len": resp.sum(-1).float().mean().item(),
        }
        return {k: out[k] for k in METRICS}

    def _advantages(self, scores: list[dict[str, float]], resp: torch.Tensor) -> torch.Tensor:
        from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

        token_rewards = torch.zeros(resp.shape)
        last = resp.sum(-1) - 1  # reward on the last response token, as verl's reward managers place it
        token_rewards[torch.arange(len(scores)), last] = torch.tensor([s["score"] for s in scores])
        index = np.repeat(np.arange(self.cfg.prompts), self.cfg.group)
        adv, _ = compute_grpo_outcome_advantage(token_rewards, resp.float(), index)
        return adv

    @staticmethod
    def _diagnostics(old: torch.Tensor, infer: torch.Tensor, resp: torch.Tensor, ent: torch.Tensor,
                     kl: torch.Tensor) -> dict[str, float]:  # fmt: skip
        """Method-independent: exact vocabulary KL, core's k3, and the tokens outside the default [0.5, 5] band."""
        from ring_ext_icepop.metrics import mismatch_metrics
        from ring_ext_icepop.variants import IcePop
        from ring_ext_icepop.weights import mismatch_weights

        w = mismatch_weights(old, infer, resp, IcePop())
        m = mismatch_metrics(w, resp, entropy=ent, prefix="")
        n = resp.sum().clamp(min=1)
        return {
            "kl_mean": (kl * resp).sum().item() / n.item(),
            "kl_max": kl[resp].max().item() if resp.any() else 0.0,
            "k3_mean": m["k3"],
            "oob_frac": m["masked_below_frac"] + m["masked_above_frac"],
            "oob_entropy": m["masked_entropy_mean"],
            "entropy": (ent * resp).sum().item() / n.item(),
            "logp_mean": (old * resp).sum().item() / n.item(),
        }

    def _update(self, batch: Batch, old: torch.Tensor, infer: torch.Tensor, ent: torch.Tensor,
                adv: torch.Tensor) -> dict[str, float]:  # fmt: skip
        from ring_ext_icepop.loss import rollout_logprobs_context

        perm = torch.randperm(old.shape[0], generator=self.gen)
        norms, clip, masked, masked_ent, tokens = [], 0.0, 0.0, 0.0, 0.0
        for idx in perm.chunk(self.cfg.mini_batches):
            sub = Batch(batch.input_ids[idx], batch.attention_mask[idx], batch.prompt_len)
            resp = sub.response_mask
            logp, _ = score(self.model, sub)
            kwargs = {"old_log_prob": old[idx], "log_prob": logp, "advantages": adv[idx], "response_mask": resp,
                      "loss_agg_mode": self.actor.loss_agg_mode, "config": self.actor}  # fmt: skip
            if self.mode == "vanilla":
                loss, metrics = self.loss_fn(**kwargs)
            else:
                with rollout_logprobs_context(infer[idx], ent[idx]):
                    loss, metrics = self.loss_fn(**kwargs)
            self.opt.zero_grad()
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.actor.grad_clip)))
            self.opt.step()
            n = float(resp.sum())
            drop = sum(float(metrics.get(f"mismatch/masked_{side}_frac", 0.0)) for side in ("below", "above"))
            tokens, clip = tokens + n, clip + n * float(metrics["actor/pg_clipfrac"])
            masked += n * drop
            masked_ent += n * drop * float(metrics.get("mismatch/masked_entropy_mean", 0.0))
        return {
            "grad_norm": float(np.mean(norms)),  # pre-clip total norm, as verl logs actor/grad_norm
            "clipfrac": clip / max(tokens, 1.0),
            "masked_frac": masked / max(tokens, 1.0),
            "masked_entropy": masked_ent / masked if masked else 0.0,
        }

"""The compounding assumption, tested directly: does the gradient bias that the mismatched copy induces
push the weights toward where copy and trainer disagree more?

At weights theta, on a batch sampled by the mismatched copy (8 prompts x 8, GRPO advantages A):
- g_mm: the gradient vanilla GRPO takes, -mean_t A grad log pi_train (verl's PPO-clip at ratio 1);
- g_ex: the same with each token weighted by k = pi_train/pi_copy (the per-token importance correction
  that makes the copy's samples count as the trainer's own);
- d = -(g_mm - g_ex) / ||g_mm - g_ex||: the part of a descent step that is due to the mismatch.
The probe-set gap (exact KL, frozen probe batch) is measured at theta +/- eps d and at theta + eps r for
random unit directions r, eps = lr x sqrt(#params) (about one Adam step) and 4x that. Two draws (batches).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.mismatch import gapdata
from experiments.mismatch.copies import RolloutCopy
from experiments.mismatch.gaprun import GapConfig, GapRun
from experiments.mismatch.policy import left_pad, prompt_ids, score
from ring_ext.tiny.reward import compute_score


def _grads(run: GapRun, ro: Any, adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    resp = ro.batch.response_mask
    params = list(run.model.parameters())
    logp, _ = score(run.model, ro.batch)
    k = (logp.detach() - ro.logp).exp()
    n = resp.sum()
    out = []
    for weight in (torch.ones_like(k), k):
        loss = -(weight * adv * logp * resp).sum() / n
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out.append(
            torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)])
        )
    return out[0], out[1]


def _gap_at(model: Any, mode: str, probe: Any, flat: torch.Tensor) -> float:
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(flat, params)
    gap = gapdata.probe_gap(model, mode, probe)["probe_kl_mean"]
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    return gap


def bias_test(
    model: Any, tok: Any, mode: str, pool: list[dict], probe: Any, lr: float, draws: int = 2, randoms: int = 4
) -> list[dict[str, Any]]:
    run = GapRun(model, tok, "vanilla", 0, GapConfig(mode=mode, lr=lr), pool)
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    eps0 = lr * theta.numel() ** 0.5
    base = gapdata.probe_gap(model, mode, probe)["probe_kl_mean"]
    out = []
    for draw in range(draws):
        rows = [r for r in random.Random(10_000 + draw).sample(pool, 8) for _ in range(8)]
        copy = RolloutCopy(model, mode)
        ro = copy.rollout(
            *left_pad([prompt_ids(tok, r) for r in rows], tok.pad_token_id),
            20,
            run.eos,
            run.pad,
            torch.Generator().manual_seed(draw),
        )
        resp = ro.batch.response_mask
        scores = [
            compute_score(
                "ring_ext/arith",
                tok.decode(ro.batch.responses[i][resp[i]].tolist(), skip_special_tokens=True),
                r["reward_model"]["ground_truth"],
            )
            for i, r in enumerate(rows)
        ]
        g_mm, g_ex = _grads(run, ro, run._advantages(scores, resp))
        diff = g_mm - g_ex
        d = -diff / diff.norm().clamp(min=1e-30)
        gen = torch.Generator().manual_seed(99 + draw)
        rnd = [r / r.norm() for r in (torch.randn(theta.shape, generator=gen) for _ in range(randoms))]
        row: dict[str, Any] = {
            "draw": draw,
            "gap0": base,
            "rel_bias": float(diff.norm() / g_ex.norm()),
            "cos_mm_ex": float(torch.nn.functional.cosine_similarity(g_mm, g_ex, 0)),
        }
        for mult in (1, 4):
            eps = mult * eps0
            row[f"eps{mult}"] = eps
            row[f"d_plus_{mult}"] = _gap_at(model, mode, probe, theta + eps * d) - base
            row[f"d_minus_{mult}"] = _gap_at(model, mode, probe, theta - eps * d) - base
            row[f"random_{mult}"] = [_gap_at(model, mode, probe, theta + eps * r) - base for r in rnd]
            row[f"positive_{mult}"] = bool(
                row[f"d_plus_{mult}"] > max(row[f"d_minus_{mult}"], *row[f"random_{mult}"])
            )
        out.append(row)
        print(f"[bias] draw {draw}: {row}", flush=True)
    return out


def bias_report(ctx: Any, lr: float, ckpt: Path) -> None:
    """At the start weights and, if `ckpt` exists (vanilla's end with the mismatched copy), at its weights."""
    points: dict[str, Any] = {"start": ctx.start}
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        points[f"vanilla@{ctx.mismatched} step {state['step']}"] = state["model"]
    result = {}
    for label, weights in points.items():
        model = ctx.model()
        model.load_state_dict(weights)
        result[label] = bias_test(model, ctx.tok, ctx.mismatched, ctx.pool, ctx.probe, lr)
    (ctx.out / "bias.json").write_text(
        json.dumps({"mode": ctx.mismatched, "lr": lr, "points": result}, indent=1)
    )
    positive = all(r["positive_1"] and r["positive_4"] for rows in result.values() for r in rows)
    print(
        f"[bias] positive in every draw and step size: {positive}; mean d_plus_1 "
        f"{np.mean([r['d_plus_1'] for rows in result.values() for r in rows]):.3e}",
        flush=True,
    )

"""Measure the train/inference gap the mismatch knob produces, on the SFT-warmed policy (no training).

    python -m experiments.mismatch.measure_kl
    # -> experiments/mismatch/results/kl_vs_knob.{json,md}, docs/figures/mismatch_kl_vs_knob.png

For each knob value (0.001 is in effect bf16 alone: that noise is far below bf16 rounding): sample 128 responses
(64 train prompts x 2) from the rollout copy, score them with the fp32 trainer, and report the exact vocabulary
KL(pi_infer || pi_train) per response token (mean, max), the fraction of tokens with k = pi_train/pi_infer
outside IcePop's [0.5, 5], and the fraction of (token, layer) router top-2 sets that differ between trainer and
rollout (the "different expert choice under near-ties" part).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from experiments.mismatch.engine import InferenceEngine
from experiments.mismatch.grpo import GRPORun
from experiments.mismatch.plot import FIGURES
from experiments.mismatch.policy import TRAIN_ROWS, entropy, exact_kl, left_pad, prompt_ids, score
from experiments.mismatch.run import RESULTS

KNOBS = (0.0, 0.001, 0.03, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)


def _router_choices(model: Any) -> tuple[list[torch.Tensor], list[Any]]:
    """Hooks that record each MoE router's top-k expert sets (sorted, so order within the set is ignored)."""
    seen: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: seen.append(out[2].sort(-1).values))
        for m in model.modules()
        if type(m).__name__ == "Qwen3MoeTopKRouter"
    ]
    return seen, hooks


def measure(model: Any, tok: Any, knob: float, dtype: torch.dtype = torch.bfloat16, prompts: int = 64,
            group: int = 2, seed: int = 0) -> dict[str, float]:  # fmt: skip
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    rows = [r for r in TRAIN_ROWS[:prompts] for _ in range(group)]
    ids, mask = left_pad([prompt_ids(tok, r) for r in rows], pad)
    engine = InferenceEngine(model, knob, dtype)
    gen = torch.Generator().manual_seed(seed)
    batch, _, _ = engine.rollout(ids, mask, 20, eos, pad, gen)
    infer_seen, h1 = _router_choices(engine.model)
    train_seen, h2 = _router_choices(model)
    gen_score = torch.Generator().manual_seed(seed + 1)
    infer_logp, infer_all = engine.score(batch, gen_score)  # one scoring pass each, with the hooks on
    with torch.no_grad():
        train_logp, train_all = score(model, batch, full=True)
    for h in h1 + h2:
        h.remove()
    assert train_all is not None
    resp = batch.response_mask
    real = batch.attention_mask.reshape(-1).bool()  # router decisions on real (non-pad) tokens only
    flips = [(a != b).any(-1)[real].float().mean() for a, b in zip(infer_seen, train_seen, strict=True)]
    diag = GRPORun._diagnostics(train_logp, infer_logp, resp, entropy(train_all), exact_kl(infer_all, train_all))
    return {
        "knob": knob, "kl_mean": diag["kl_mean"], "kl_max": diag["kl_max"], "k3_mean": diag["k3_mean"],
        "oob_frac": diag["oob_frac"], "expert_flip_frac": float(torch.stack(flips).mean()),
        "identical_logp": bool(torch.equal(train_logp, infer_logp)), "tokens": int(resp.sum()),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--knobs", nargs="+", type=float, default=list(KNOBS))
    p.add_argument("--infer-dtype", default="bfloat16")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from experiments.mismatch.sft import sft_policy

    model, tok = sft_policy()
    rows = [measure(model, tok, k, getattr(torch, args.infer_dtype)) for k in args.knobs]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kl_vs_knob.json").write_text(json.dumps(rows, indent=1))
    head = ("| knob (router-noise std) | rollout dtype | KL mean | KL max | k outside [0.5,5] (per mille) "
            "| router top-2 flips (%) | log-probs bit-identical |")  # fmt: skip
    md = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        dt = "float32" if r["knob"] == 0 else args.infer_dtype
        md.append(f"| {r['knob']} | {dt} | {r['kl_mean']:.2e} | {r['kl_max']:.3g} | {1000 * r['oob_frac']:.2f} "
                  f"| {100 * r['expert_flip_frac']:.2f} | {r['identical_logp']} |")  # fmt: skip
    (args.out / "kl_vs_knob.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    _figure([r for r in rows if r["knob"] > 0], FIGURES / "mismatch_kl_vs_knob.png")


def _figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    knobs = [r["knob"] for r in rows]
    ax.loglog(knobs, [r["kl_mean"] for r in rows], "o-", label="KL mean")
    ax.loglog(knobs, [r["kl_max"] for r in rows], "s--", label="KL max")
    ax.loglog(knobs, [max(r["oob_frac"], 1e-5) for r in rows], "^:", label="frac. k outside [0.5,5]")
    ax.set_xlabel("mismatch knob (router-noise std; rollout in bf16)")
    ax.set_ylabel("measured train/infer gap")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(path)


if __name__ == "__main__":
    main()

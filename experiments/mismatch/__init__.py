"""Train/inference mismatch experiments: GRPO on the tiny MoE with vanilla, TIS, IcePop and KPop losses.

A lighter harness than verl + vLLM (see docs/mismatch.md): the same tiny Qwen3-MoE and the same ring-ext losses
(through verl's policy-loss registry), with a plain-torch sampler whose rollout copy is either re-derived from the
current weights at every sync (`copies.py`: fp32, bf16, fp8; `study.py`) or perturbed by router noise (`engine.py`,
`run.py`).
"""

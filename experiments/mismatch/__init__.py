"""Train/inference mismatch experiment: GRPO on the tiny MoE with vanilla, TIS, IcePop and KPop losses.

A lighter harness than verl + vLLM (see docs/mismatch.md): the same tiny Qwen3-MoE and the same ring-ext losses
(through verl's policy-loss registry), with a plain-torch sampler whose rollout copy has a mismatch knob.
"""

"""Builders for calling verl's real actor loss call site (`verl.workers.utils.losses.ppo_loss`)."""

from __future__ import annotations

import torch
from tensordict import TensorDict

from ring_ext.verl_config import compose_verl

PROMPT_LEN = 3


def compose_config(*overrides: str):
    """Recipe ring1t as plain GRPO (vanilla loss unless an override picks one), so each test names its loss."""
    return compose_verl(["+recipe=ring1t", "ring1t_loop=grpo", *overrides])


def compose_actor(*overrides: str):
    """The actor config exactly as verl's trainer gets it: composed by Hydra, converted to its dataclass."""
    from verl.utils.config import omega_conf_to_dataclass

    cfg = compose_config(*overrides)
    return cfg, omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def actor_batch(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor | None,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    lag: torch.Tensor | None = None,
    nested: bool = False,
) -> tuple[dict, TensorDict]:
    """A micro-batch in verl's padded layout, and the model output verl's loss slices log-probs from.

    Each sequence is PROMPT_LEN prompt tokens + T response tokens; the model output is the flat
    (no-padding) log-prob vector whose response slice is `log_prob` (gradients flow back to it).
    `nested`: the fields as jagged tensors, each row as long as its response (what verl's workers hand the loss).
    """
    batch, length = old_log_prob.shape
    flat = [torch.cat([log_prob.new_zeros(PROMPT_LEN - 1), log_prob[b], log_prob.new_zeros(1)]) for b in range(batch)]
    fields = {
        "prompts": torch.ones(batch, PROMPT_LEN, dtype=torch.long),
        "responses": torch.ones(batch, length, dtype=torch.long),
        "attention_mask": torch.ones(batch, PROMPT_LEN + length, dtype=torch.long),
        "response_mask": response_mask.long(),
        "old_log_probs": old_log_prob,
        "advantages": advantages,
    }
    if rollout_log_prob is not None:
        fields["rollout_log_probs"] = rollout_log_prob
    if lag is not None:  # C3PO++'s per-token version lag (ring_ext.batch_fields.ROLLOUT_POLICY_LAG)
        fields["rollout_policy_lag"] = lag
    if nested:  # verl's real layout: one jagged row per sequence, response fields as long as the response
        lengths = response_mask.long().sum(dim=1).tolist()
        assert all(bool(response_mask[b, :n].all()) for b, n in enumerate(lengths)), "nested needs prefix masks"
        flat = [torch.cat([log_prob.new_zeros(PROMPT_LEN - 1), log_prob[b, :n], log_prob.new_zeros(1)])
                for b, n in enumerate(lengths)]
        fields = {key: torch.nested.as_nested_tensor(
                      [value[b] if key == "prompts" else value[b, :n] for b, n in enumerate(lengths)],
                      layout=torch.jagged)
                  for key, value in fields.items() if key != "attention_mask"}
    data = TensorDict(fields, batch_size=[batch])
    for key, value in (("dp_size", 1), ("batch_num_tokens", None), ("global_batch_size", None)):
        data.set_non_tensor(key, value)
    return {"log_probs": torch.cat(flat)}, data

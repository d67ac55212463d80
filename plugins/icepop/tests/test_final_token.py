"""The masked final token (verl PR #6362): does the reward of a response whose last token is masked still enter
GRPO's advantage? Through verl 0.9.1's real advantage path, the calls of the v1 trainer's `_compute_advantage`
(`compute_rollout_correction_and_add_to_batch`, then `compute_advantage_for_multi_trajectories`, which calls
`compute_grpo_outcome_advantage`), and its real loss call site with IcePop.

It does, on both paths, and on ring-ext's that is IcePop's semantics, not a leak: the reward is the outcome of the
whole sampled response, and Eq. 1 of the paper weighs every token of y_i by the same group advantage A_i, times a
per-token M(k). Masking a token removes that token's gradient, never the response's outcome (which would also move
its peers' baseline).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from icepop_batches import actor_batch, compose_actor

F64 = torch.float64


def _grpo_advantages(old: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor, rewards: list[float],
                     rollout_rs: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, response mask) of one GRPO group as verl 0.9.1's v1 trainer computes them: reward on the last
    response token (as verl's reward managers put it), rollout correction (`rollout_rs`: verl's own rejection),
    then the GRPO advantage of each response's final output."""
    from verl.protocol import DataProto
    from verl.trainer.config.algorithm import RolloutCorrectionConfig
    from verl.trainer.ppo.core_algos import AdvantageEstimator
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

    n = len(rewards)
    scores = torch.zeros_like(old)
    scores[torch.arange(n), mask.sum(dim=1) - 1] = torch.tensor(rewards, dtype=old.dtype)
    data = DataProto.from_dict(
        tensors={"token_level_rewards": scores, "response_mask": mask.to(F64), "old_log_probs": old,
                 "rollout_log_probs": rollout},
        non_tensors={"uid": np.array(["prompt0"] * n, dtype=object)})
    correction = RolloutCorrectionConfig(rollout_is=None, rollout_rs=rollout_rs, rollout_rs_threshold="0.2_2.0")
    data, _ = compute_rollout_correction_and_add_to_batch(data, correction)
    data = compute_advantage_for_multi_trajectories(
        data, batch_keys=[f"prompt0_{i}_0" for i in range(n)], adv_estimator=AdvantageEstimator.GRPO, num_repeat=n)
    return data.batch["advantages"], data.batch["response_mask"].bool()


def test_a_masked_final_tokens_reward_still_sets_its_responses_advantage(ppo_loss) -> None:
    mask = torch.tensor([[True] * 4, [True] * 3 + [False], [True] * 4])
    ks = torch.tensor([[1.0, 2.0, 1.0, 50.0], [1.0] * 4, [1.0, 1.0, 0.8, 1.0]], dtype=F64)  # row 0 ends at k = 50
    old = torch.full((3, 4), -1.2, dtype=F64)
    rollout = old - torch.log(ks)
    rewards = [1.0, 0.0, 0.0]
    std = np.std(rewards, ddof=1)
    a = [(r - np.mean(rewards)) / (std + 1e-6) for r in rewards]  # GRPO: (R_i - mean) / (std + eps), per group

    # ring-ext's path: verl's rollout correction off (the recipes' default), IcePop masks in the loss only. The
    # advantage of response 0 is its reward's, on every token, the masked final one included.
    adv, adv_mask = _grpo_advantages(old, rollout, mask, rewards, rollout_rs=None)
    assert torch.equal(adv_mask, mask)
    torch.testing.assert_close(adv, torch.tensor(a, dtype=F64)[:, None] * mask)

    _, icepop = compose_actor("actor_rollout_ref.actor.policy_loss.loss_mode=icepop")
    log_prob = old.clone().requires_grad_(True)  # ratio 1: the loss is -(1/N) sum_i sum_t M_t A_i
    output, data = actor_batch(log_prob, old, rollout, adv, mask)
    loss, _ = ppo_loss(icepop, output, data)
    loss.backward()
    weights = torch.where(mask & (ks <= 5.0), ks, 0.0)  # IcePop [0.5, 5]: the final k = 50 of row 0 weighs 0
    assert loss.item() == pytest.approx(-(weights * torch.tensor(a, dtype=F64)[:, None]).sum().item() / 11)
    assert log_prob.grad[0, 3] == 0.0  # the masked final token: no gradient
    assert (log_prob.grad[0, :3] < 0).all()  # its response's other tokens: pushed up by its reward (A_0 > 0)

    # verl's own token rejection (rollout_rs=token_k1 on the same band: -log k in [log 0.2, log 2]) zeroes the final
    # token in response_mask before the advantage: its reward still sets the advantage of the response's other
    # tokens, as verl PR #6362 reports; its peers' advantages do not move either way.
    adv_rs, rs_mask = _grpo_advantages(old, rollout, mask, rewards, rollout_rs="token_k1")
    assert rs_mask[0].tolist() == [True, True, True, False]
    torch.testing.assert_close(adv_rs, torch.tensor(a, dtype=F64)[:, None] * rs_mask)
    torch.testing.assert_close(adv_rs[1:], adv[1:])

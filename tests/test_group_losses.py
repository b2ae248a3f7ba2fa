"""Group-baseline advantages (GRPO, Dr. GRPO, RLOO) and the clipped group objective, against hand values."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.losses import group_advantages, group_policy_loss


def test_grpo_advantages_by_hand_with_ties_and_a_flat_group():
    scores = torch.tensor([1.0, 2.0, 2.0, 3.0,   # ties inside a group
                           5.0, 5.0, 5.0, 5.0])  # every reward equal: no signal
    advantages, zero_spread = group_advantages(scores, 4, "grpo")
    std = math.sqrt(((1 - 2) ** 2 + 0 + 0 + (3 - 2) ** 2) / 3)  # sample std (n - 1)
    expected = [(1 - 2) / (std + 1e-4), 0.0, 0.0, (3 - 2) / (std + 1e-4), 0, 0, 0, 0]
    assert advantages.tolist() == pytest.approx(expected, abs=1e-6)
    assert zero_spread.tolist() == [False, True]


def test_dr_grpo_keeps_the_scale_and_rloo_leaves_one_out():
    scores = torch.tensor([0.0, 1.0, 5.0, 10.0, 10.0, 4.0])  # two groups of 3
    unscaled, _ = group_advantages(scores, 3, "grpo", scale=False)
    assert unscaled.tolist() == pytest.approx([-2.0, -1.0, 3.0, 2.0, 2.0, -4.0])
    rloo, zero_spread = group_advantages(scores, 3, "rloo")
    # r_i minus the mean of the other two
    expected = [0 - (1 + 5) / 2, 1 - (0 + 5) / 2, 5 - (0 + 1) / 2, 10 - (10 + 4) / 2, 10 - (10 + 4) / 2, 4 - 10]
    assert rloo.tolist() == pytest.approx(expected)
    assert not zero_spread.any()
    # RLOO's advantages sum to zero in each group, and GRPO's scaled ones have unit sample std
    assert rloo.view(2, 3).sum(1).abs().max() < 1e-6
    scaled, _ = group_advantages(scores, 3, "grpo")
    assert scaled.view(2, 3).std(1).tolist() == pytest.approx([1.0, 1.0], abs=1e-3)


def test_group_advantage_errors():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="grpo or rloo"):
        group_advantages(torch.zeros(4), 2, "ppo")


def test_clipped_group_objective_by_hand():
    # one response of 3 tokens with A = +1, one of 2 tokens with A = -2 (third position masked)
    logprobs = torch.tensor([[math.log(0.5), math.log(0.9), math.log(0.3)], [math.log(0.2), math.log(0.6), 0.0]])
    old = torch.tensor([[math.log(0.5), math.log(0.6), math.log(0.4)], [math.log(0.4), math.log(0.4), 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages = torch.tensor([1.0, -2.0])
    ratios = [[1.0, 1.5, 0.75], [0.5, 1.5]]
    # A > 0: -A * min(r, 1.2) per token (the max of the two negatives); A < 0: 2 * max(r, 0.8)
    row0 = [-min(r, 1.2) for r in ratios[0]]
    row1 = [2 * max(r, 0.8) for r in ratios[1]]
    loss, count, metrics = group_policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    assert float(loss) == pytest.approx(sum(row0) / 3 + sum(row1) / 2, rel=1e-5)
    assert float(count) == 2
    # clipped where the clipped term is the larger: r = 1.5 with A > 0, r = 0.5 with A < 0
    assert float(metrics["clip_fraction"]) == 2 and float(metrics["tokens"]) == 5
    token_loss, token_count, _ = group_policy_loss(logprobs, old, advantages, mask, clip_range=0.2, loss_norm="token")
    assert float(token_loss) == pytest.approx(sum(row0) + sum(row1), rel=1e-5) and float(token_count) == 5


def test_k3_term_by_hand_and_its_limits():
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.25)]])
    mask = torch.ones(1, 2)
    loss, _, metrics = group_policy_loss(logprobs, logprobs.detach(), torch.zeros(1), mask, ref_logprobs=ref,
                                         kl_coef=0.1)
    k3 = (0.25 / 0.5) - math.log(0.25 / 0.5) - 1  # q/p - log(q/p) - 1 >= 0, 0 where p = q
    assert float(metrics["k3"]) == pytest.approx(k3, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(0.1 * k3 / 2, rel=1e-5)  # A = 0: only the KL term, mean over 2 tokens
    loss.backward()
    # d k3 / d logp = 1 - q/p: pushes logp down where the policy is above the reference, nothing where equal
    assert logprobs.grad.tolist()[0] == pytest.approx([0.1 * (1 - 0.5) / 2, 0.0], abs=1e-6)


def test_on_policy_gradient_is_minus_advantage_times_score_function():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    advantages = torch.tensor([2.0, -1.0])
    loss, count, _ = group_policy_loss(logprobs, logprobs.detach(), advantages, torch.ones(2, 2))
    (loss / count).backward()
    assert float(loss.detach()) == pytest.approx(-(2.0 - 1.0))  # ratio 1: -A per response, means over tokens
    assert logprobs.grad.flatten().tolist() == pytest.approx([-2.0 / 4, -2.0 / 4, 1.0 / 4, 1.0 / 4])

"""PPO pieces against hand-computed values and known limits."""

import math

import pytest
import torch

from tunelab.losses import (AdaptiveKLController, explained_variance, gae, kl_estimate, masked_whiten,
                            ppo_policy_loss, ppo_value_loss, token_rewards)


def close(tensor, expected):
    torch.testing.assert_close(tensor, torch.tensor(expected, dtype=tensor.dtype), rtol=1e-5, atol=1e-6)


def test_gae_hand_computed_with_a_masked_tail():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])  # the 4th position is padding: its reward and value are ignored
    gamma, lam = 0.9, 0.8
    d2 = 2.0 - 1.5                     # last valid token: no bootstrap
    d1 = 0.0 + gamma * 1.5 - 1.0
    d0 = 1.0 + gamma * 1.0 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert adv.tolist()[0] == pytest.approx([a0, a1, a2, 0.0])
    assert ret.tolist()[0] == pytest.approx([a0 + 0.5, a1 + 1.0, a2 + 1.5, 0.0])


def test_gae_limits():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, -0.5, 2.0]])
    values = torch.tensor([[0.2, 0.4, 0.6], [1.0, 1.0, 1.0]])
    mask = torch.ones(2, 3)
    # lambda = 1, gamma = 1: returns are the reward-to-go (Monte Carlo), whatever the values
    _, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(ret, [[1.0, 1.0, 1.0], [2.0, 1.5, 2.0]])
    # lambda = 0: one-step TD errors
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=0.0)
    assert adv.tolist()[0] == pytest.approx([0.0 + 0.4 - 0.2, 0.0 + 0.6 - 0.4, 1.0 - 0.6])


def test_token_rewards_put_the_score_on_the_last_response_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    rewards = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    close(rewards, [[-0.05, -0.1, -0.15 + 2.0, 0.0], [-0.25 - 1.0, 0.0, 0.0, 0.0]])


def test_kl_estimators():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -2.0]])
    close(kl_estimate(logp, ref, "k1"), [[0.5, 0.0]])
    # k3 = (q/p - 1) - log(q/p) with log(q/p) = -0.5
    close(kl_estimate(logp, ref, "k3"), [[math.exp(-0.5) - 1 + 0.5, 0.0]])
    assert (kl_estimate(torch.randn(50), torch.randn(50), "k3") >= 0).all()
    with pytest.raises(ValueError, match="unknown KL estimator 'k2'"):
        kl_estimate(logp, ref, "k2")


def test_policy_loss_without_and_with_clipping():
    mask = torch.ones(1, 2)
    old = torch.tensor([[-1.0, -1.0]])
    adv = torch.tensor([[1.0, -2.0]])
    # ratio 1: the loss is -mean(A), nothing clipped
    loss, metrics = ppo_policy_loss(old.clone(), old, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-(1.0 - 2.0) / 2)
    assert metrics["clip_fraction"].item() == 0.0 and metrics["approx_kl"].item() == 0.0
    # ratio e^0.5 = 1.65 on both tokens: the positive advantage is clipped at 1.2, the negative is not
    new = old + 0.5
    loss, metrics = ppo_policy_loss(new, old, adv, mask, clip_range=0.2)
    r = math.exp(0.5)
    assert loss.item() == pytest.approx((-1.0 * 1.2 + 2.0 * r) / 2)
    assert metrics["clip_fraction"].item() == pytest.approx(0.5)
    assert metrics["approx_kl"].item() == pytest.approx(0.125)


def test_value_loss_without_and_with_clipping():
    mask = torch.tensor([[1, 1, 0]])
    returns = torch.tensor([[1.0, 0.0, 5.0]])
    old = torch.tensor([[0.0, 0.0, 0.0]])
    # inside the clip range: 0.5 * mean((V - R)^2)
    loss, _ = ppo_value_loss(torch.tensor([[0.1, -0.1, 9.0]]), old, returns, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.5 * ((0.9 ** 2 + 0.1 ** 2) / 2))
    # V moved 1.0 toward R=1 from V_old=0: the clipped value 0.2 has the larger error, so it counts
    loss, metrics = ppo_value_loss(torch.tensor([[1.0, 0.0, 0.0]]), old, returns, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.5 * ((0.8 ** 2 + 0.0) / 2))
    assert metrics["value_clip_fraction"].item() == pytest.approx(0.5)


def test_masked_whiten_and_explained_variance():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    white = masked_whiten(values, mask)
    assert white[0, 3].item() == 0.0
    kept = white[0, :3]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert kept.pow(2).mean().item() == pytest.approx(1.0, rel=1e-4)
    assert masked_whiten(values, mask, shift_mean=False)[0, :3].mean().item() == pytest.approx(2.0, rel=1e-5)
    target = torch.tensor([[1.0, 2.0, 3.0]])
    assert explained_variance(target, target, torch.ones(1, 3)) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 3), 2.0), target, torch.ones(1, 3)) == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_controller_moves_toward_the_target_and_is_bounded():
    controller = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert controller.update(current_kl=12.0, n_steps=100) == pytest.approx(0.2 * (1 + 0.2 * 100 / 10000))
    controller = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert controller.update(current_kl=3.0, n_steps=100) == pytest.approx(0.2 * (1 - 0.2 * 100 / 10000))
    controller = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert controller.update(current_kl=6.6, n_steps=100) == pytest.approx(0.2 * (1 + 0.1 * 100 / 10000))

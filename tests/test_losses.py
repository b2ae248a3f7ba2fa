"""Loss functions against hand-computed values."""

import math

import pytest
import torch

from tunelab.losses import masked_mean, sft_loss


def test_sft_loss_sums_only_masked_positions():
    logprobs = torch.tensor([[0.0, math.log(0.5), math.log(0.25), -7.0],
                             [0.0, math.log(0.1), -3.0, -5.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]])
    total, count = sft_loss(logprobs, mask)
    # -(log .5 + log .25 + log .1); the -7, -3 and -5 positions are masked out
    assert math.isclose(total.item(), -(math.log(0.5) + math.log(0.25) + math.log(0.1)), rel_tol=1e-6)
    assert count.item() == 3


def test_sft_loss_of_a_perfect_model_is_zero_and_of_uniform_is_log_vocab():
    mask = torch.tensor([[0, 1, 1, 1]])
    assert sft_loss(torch.zeros(1, 4), mask)[0].item() == 0.0
    vocab = 1000
    uniform = torch.full((1, 4), -math.log(vocab))
    total, count = sft_loss(uniform, mask)
    assert math.isclose((total / count).item(), math.log(vocab), rel_tol=1e-6)


def test_masked_mean_ignores_masked_values_and_handles_empty_mask():
    values = torch.tensor([1.0, 2.0, 100.0])
    assert masked_mean(values, torch.tensor([1, 1, 0])).item() == 1.5
    assert masked_mean(values, torch.tensor([0, 0, 0])).item() == 0.0


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_bradley_terry_loss_hand_computed():
    from tunelab.losses import bradley_terry_loss

    chosen, rejected = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([1.0, 1.5, -1.0])
    total, metrics = bradley_terry_loss(chosen, rejected)
    expected = -(math.log(_sig(1.0)) + math.log(_sig(-1.0)) + math.log(_sig(0.0)))
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["accuracy"].item() == pytest.approx(1 / 3)  # a tie is not a win
    assert metrics["margin"].item() == pytest.approx(0.0)
    rewards = [2.0, 0.5, -1.0, 1.0, 1.5, -1.0]
    mean = sum(rewards) / 6
    assert metrics["reward_mean"].item() == pytest.approx(mean)
    assert metrics["reward_std"].item() == pytest.approx(math.sqrt(sum((r - mean) ** 2 for r in rewards) / 6))


def test_bradley_terry_equal_rewards_give_log2_and_margin_shifts_the_sigmoid():
    from tunelab.losses import bradley_terry_loss

    same = torch.tensor([0.3, -0.7])
    assert bradley_terry_loss(same, same)[0].item() == pytest.approx(2 * math.log(2), rel=1e-6)
    chosen, rejected, margin = torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([2.0])
    # winning by exactly the margin counts as a tie: log 2
    assert bradley_terry_loss(chosen, rejected, margin)[0].item() == pytest.approx(math.log(2), rel=1e-6)
    assert bradley_terry_loss(chosen, rejected, torch.tensor([0.5]))[0].item() == pytest.approx(
        -math.log(_sig(1.5)), rel=1e-6)
    # a large gap drives the loss to 0
    assert bradley_terry_loss(torch.tensor([30.0]), torch.tensor([0.0]))[0].item() < 1e-12


def test_reward_centering_adds_coef_times_squared_sum():
    from tunelab.losses import bradley_terry_loss

    chosen, rejected = torch.tensor([2.0, 1.0]), torch.tensor([1.0, -3.0])
    plain = bradley_terry_loss(chosen, rejected)[0].item()
    centered = bradley_terry_loss(chosen, rejected, center_coef=0.01)[0].item()
    assert centered - plain == pytest.approx(0.01 * ((2 + 1) ** 2 + (1 - 3) ** 2), rel=1e-5)


def test_bradley_terry_gradient_pushes_chosen_up_and_rejected_down():
    from tunelab.losses import bradley_terry_loss

    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected)[0].backward()
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.5)


def _dpo(z_chosen, z_rejected, **kwargs):
    from tunelab.losses import dpo_loss

    zero = torch.zeros(len(z_chosen))
    return dpo_loss(torch.tensor(z_chosen), torch.tensor(z_rejected), zero, zero, **kwargs)


def test_dpo_sigmoid_is_log2_when_policy_equals_reference():
    from tunelab.losses import dpo_loss

    logps = torch.tensor([-12.5, -3.0, -40.0])
    total, metrics = dpo_loss(logps, logps - 1.0, logps, logps - 1.0, beta=0.3)
    assert total.item() / 3 == pytest.approx(math.log(2), rel=1e-7)
    assert metrics["reward_margin"].item() == 0.0 and metrics["reward_accuracy"].item() == 0.0


def test_dpo_losses_hand_computed():
    beta = 0.5
    # z = (chosen logratio) - (rejected logratio) = 2 - (-2) = 4 for the single pair below
    z = 4.0
    assert _dpo([2.0], [-2.0], beta=beta)[0].item() == pytest.approx(-math.log(_sig(beta * z)), rel=1e-6)
    eps = 0.1
    cdpo = -(1 - eps) * math.log(_sig(beta * z)) - eps * math.log(_sig(-beta * z))
    assert _dpo([2.0], [-2.0], beta=beta, label_smoothing=eps)[0].item() == pytest.approx(cdpo, rel=1e-6)
    robust = (-(1 - eps) * math.log(_sig(beta * z)) + eps * math.log(_sig(-beta * z))) / (1 - 2 * eps)
    assert _dpo([2.0], [-2.0], beta=beta, loss_type="robust", label_smoothing=eps)[0].item() == pytest.approx(
        robust, rel=1e-6)
    assert _dpo([2.0], [-2.0], beta=beta, loss_type="ipo")[0].item() == pytest.approx((z - 1 / (2 * beta)) ** 2)
    assert _dpo([2.0], [-2.0], beta=beta, loss_type="hinge")[0].item() == pytest.approx(0.0)  # 1 - 0.5*4 < 0
    assert _dpo([0.5], [0.0], beta=beta, loss_type="hinge")[0].item() == pytest.approx(1 - 0.25)


def test_dpo_limits_and_metrics():
    from tunelab.losses import dpo_loss

    # a large margin in the right direction drives the sigmoid loss to 0, the wrong one grows linearly
    assert _dpo([50.0], [-50.0], beta=1.0)[0].item() < 1e-30
    assert _dpo([-50.0], [50.0], beta=1.0)[0].item() == pytest.approx(100.0, rel=1e-6)
    # robust with eps = 0 is plain DPO
    assert _dpo([1.0], [0.0], loss_type="robust")[0].item() == pytest.approx(_dpo([1.0], [0.0])[0].item())
    # ipo is minimised exactly at z = 1 / (2 beta)
    assert _dpo([5.0], [0.0], beta=0.1, loss_type="ipo")[0].item() == pytest.approx(0.0)
    total, metrics = dpo_loss(torch.tensor([-10.0, -20.0]), torch.tensor([-15.0, -18.0]),
                              torch.tensor([-11.0, -20.0]), torch.tensor([-14.0, -19.0]), beta=0.1)
    assert metrics["reward_chosen"].item() == pytest.approx(0.1 * (1.0 + 0.0) / 2)
    assert metrics["reward_rejected"].item() == pytest.approx(0.1 * (-1.0 + 1.0) / 2)
    assert metrics["reward_accuracy"].item() == pytest.approx(0.5)
    assert metrics["logp_chosen"].item() == pytest.approx(-15.0)
    with pytest.raises(ValueError, match="unknown DPO loss 'kto'"):
        _dpo([1.0], [0.0], loss_type="kto")

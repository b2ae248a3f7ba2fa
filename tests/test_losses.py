"""Loss functions against hand-computed values."""

import math

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

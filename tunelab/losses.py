"""Losses as pure tensor functions: no models, no data loading.

Each returns what the training loop needs (a sum and the count it is averaged over, so gradient
accumulation can average over the whole accumulated batch exactly) plus anything worth logging.
"""

from __future__ import annotations

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of `values` where `mask` is nonzero. `values`, `mask`: same shape."""
    return (values * mask.to(values.dtype)).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is nonzero (0 when the mask is empty)."""
    count = mask.sum()
    return masked_sum(values, mask) / count.clamp(min=1).to(values.dtype)


def sft_loss(token_logprobs: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked next-token cross-entropy, returned as (sum, token count).

    loss = -sum_{t: mask_t = 1} log p(x_t | x_<t), to be divided by the number of trained tokens of the
    whole (accumulated) batch, which gives the token-level mean used by instruction tuning with the
    loss on the response only.

    `token_logprobs`, `loss_mask`: `[B, T]`.
    """
    return -masked_sum(token_logprobs, loss_mask), loss_mask.sum()


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None, center_coef: float = 0.0
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise reward-model loss (Bradley & Terry, 1952; as in Ouyang et al., 2022), summed over pairs.

    loss_i = -log sigmoid(r_chosen_i - r_rejected_i - margin_i) + center_coef * (r_chosen_i + r_rejected_i)^2

    The margin (Touvron et al., 2023) asks chosen to win by at least that much; the centering term
    (Eisenstein et al., 2023) keeps rewards near zero so their scale means something. Divided by the
    number of pairs it gives the mean loss.

    Args: `chosen_rewards`, `rejected_rewards`, `margin`: `[N]`.
    Returns (loss sum, metrics): accuracy (share of pairs with r_chosen > r_rejected), mean margin
    r_chosen - r_rejected, and the mean and std of all rewards; metrics are detached.
    """
    diff = chosen_rewards - rejected_rewards
    target = diff - margin if margin is not None else diff
    losses = -torch.nn.functional.logsigmoid(target)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    rewards = torch.cat([chosen_rewards, rejected_rewards]).detach()
    metrics = {
        "accuracy": (diff > 0).float().mean().detach(),
        "margin": diff.mean().detach(),
        "reward_mean": rewards.mean(),
        "reward_std": rewards.std(unbiased=False),
    }
    return losses.sum(), metrics

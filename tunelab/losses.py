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


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct Preference Optimization losses (Rafailov et al., 2023) and variants, summed over pairs.

    With the log-ratio difference  z = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)):

    - `sigmoid` (DPO):   -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z); eps = label_smoothing > 0 is
                         conservative DPO (cDPO, Mitchell 2023), for labels flipped with probability eps.
    - `robust`:          [-(1 - eps) log sigmoid(beta z) + eps log sigmoid(-beta z)] / (1 - 2 eps), the unbiased
                         loss under label noise eps (Chowdhury et al., 2024); needs 0 <= eps < 0.5.
    - `ipo`:             (z - 1 / (2 beta))^2 (Azar et al., 2023), regresses the gap to a fixed target.
    - `hinge`:           max(0, 1 - beta z) (SLiC, Zhao et al., 2023).

    At the start, when the policy equals the reference, z = 0 and the sigmoid loss is log 2 per pair.

    Args: sequence log-probs `[N]` (summed over completion tokens) of the policy and the reference.
    Returns (loss sum, metrics): implicit rewards beta * (logp - ref_logp) of chosen and rejected,
    reward accuracy and margin, and the policy log-probs; metrics are detached means.
    """
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    z = chosen_logratio - rejected_logratio
    logsig = torch.nn.functional.logsigmoid
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * logsig(beta * z) - label_smoothing * logsig(-beta * z)
    elif loss_type == "robust":
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
        losses = (-(1 - label_smoothing) * logsig(beta * z) + label_smoothing * logsig(-beta * z)) / (
            1 - 2 * label_smoothing)
    elif loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    else:
        raise ValueError(f"unknown DPO loss '{loss_type}'; expected one of {', '.join(DPO_LOSSES)}")
    chosen_rewards = (beta * chosen_logratio).detach()
    rejected_rewards = (beta * rejected_logratio).detach()
    metrics = {
        "reward_chosen": chosen_rewards.mean(),
        "reward_rejected": rejected_rewards.mean(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
        "logp_chosen": policy_chosen.detach().mean(),
        "logp_rejected": policy_rejected.detach().mean(),
    }
    return losses.sum(), metrics

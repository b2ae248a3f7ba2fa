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

"""Epoch order, length-grouped batches and padding.

The order of an epoch is a pure function of (seed, epoch), so a resumed run regenerates exactly the
batches it would have seen, and the data position is just (epoch, batch index).
"""

from __future__ import annotations

import math
import random

import torch


def mixture_indices(source_sizes: list[int], weights: list[float], seed: int, epoch: int) -> list[int]:
    """Indices into the concatenation of the sources for one epoch, mixing them by weight.

    A source of n rows with weight w contributes round(w * n) rows: every row floor(w) times, then a
    random subset for the fractional part (a fresh subset each epoch).
    """
    rng = random.Random(f"{seed}-mix-{epoch}")
    out: list[int] = []
    offset = 0
    for size, weight in zip(source_sizes, weights):
        target = round(weight * size)
        whole, rest = divmod(target, size) if size else (0, 0)
        rows = list(range(offset, offset + size))
        out.extend(rows * whole)
        out.extend(rng.sample(rows, rest))
        offset += size
    return out


def epoch_batches(indices: list[int], lengths: list[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True) -> list[list[int]]:
    """Split one epoch's indices into batches.

    With `group_by_length`, the shuffled indices are cut into windows of 64 batches, each window is
    sorted by length and cut into batches, and the batch order is shuffled: rows in a batch have
    similar lengths (little padding) while the epoch stays random.
    """
    rng = random.Random(f"{seed}-order-{epoch}")
    order = list(indices)
    rng.shuffle(order)
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * 64
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def batches_per_epoch(n_rows: int, batch_size: int) -> int:
    return math.ceil(n_rows / batch_size)


def pad_batch(sequences: list[list[int]], masks: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token ids and loss masks into tensors.

    Returns `input_ids [B, T]`, `attention_mask [B, T]` and `loss_mask [B, T]` (0 on padding).
    """
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, mask) in enumerate(zip(sequences, masks)):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
        loss_mask[row, :len(mask)] = torch.tensor(mask, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}

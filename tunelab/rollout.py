"""Batched generation with the KV cache (HF `generate`)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             batch_size: int = 16, seed: int | None = None) -> list[str]:
    """Continue each prompt; returns the generated text only (without the prompt), special tokens dropped.

    `temperature` 0 means greedy decoding. Prompts are left-padded in batches so that every row's
    new tokens start at the same position.
    """
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    sampling = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k or 0, "top_p": top_p or 1.0}
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(device)
            new = model.generate(**encoded, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **sampling)[:, encoded["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs

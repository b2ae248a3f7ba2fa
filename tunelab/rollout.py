"""Generation: batched sampling with the KV cache (HF `generate`), and PPO rollouts."""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from tunelab.eos import stop_token_ids


def left_padded(tokenizer, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Prompts tokenized and left-padded, so that every row's new tokens start at the same position."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    finally:
        tokenizer.padding_side = side


def encoded_prompts(model: nn.Module, tokenizer, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Prompts tokenized for `generate`: left-padded for a causal LM (`left_padded`); for an encoder-decoder,
    whose prompts go to the encoder, right-padded as in training."""
    from tunelab.logprobs import is_encoder_decoder

    if is_encoder_decoder(model):
        side = tokenizer.padding_side
        tokenizer.padding_side = "right"
        try:
            return tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        finally:
            tokenizer.padding_side = side
    return left_padded(tokenizer, prompts, device)


def new_tokens(model: nn.Module, output: torch.Tensor, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
    """The generated tokens of `generate`'s output `[B, L]`: after the prompt of a causal LM, after the decoder's
    start token of an encoder-decoder (whose output holds decoder tokens only)."""
    from tunelab.logprobs import is_encoder_decoder

    return output[:, 1:] if is_encoder_decoder(model) else output[:, encoded["input_ids"].shape[1]:]


class ReservedLayer(DynamicLayer):
    """A key/value cache layer that writes each step's states into a buffer made once with room for `reserve`
    more tokens, where transformers' dynamic layer concatenates, copying the whole cache at every token (an
    eighth of a rollout's time on CPU). The states handed to attention are views of the buffer, the same
    values in the same order, so the samples do not change. A layer whose states were replaced from outside
    (cropped, reordered) starts a new buffer from them."""

    def __init__(self, reserve: int):
        super().__init__()
        self.reserve = reserve
        self._keys = self._values = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.get_seq_length()
        ours = self._keys is not None and held > 0 and self.keys.data_ptr() == self._keys.data_ptr()
        end = held + key_states.shape[-2]
        if not ours or end > self._keys.shape[-2]:
            room = end + self.reserve
            keys = key_states.new_empty((*key_states.shape[:-2], room, key_states.shape[-1]))
            values = value_states.new_empty((*value_states.shape[:-2], room, value_states.shape[-1]))
            if held:
                keys[..., :held, :] = self.keys
                values[..., :held, :] = self.values
            self._keys, self._values = keys, values
        self._keys[..., held:end, :] = key_states
        self._values[..., held:end, :] = value_states
        self.keys, self.values = self._keys[..., :end, :], self._values[..., :end, :]
        return self.keys, self.values

    def reset(self) -> None:
        self._keys = self._values = None
        super().reset()


def reserved_cache(model: nn.Module, reserve: int, num_beams: int = 1) -> dict:
    """`generate` keyword arguments for a cache of `ReservedLayer`s with room for `reserve` new tokens, where the
    model would get transformers' plain dynamic cache anyway (every layer full attention, no beam search);
    nothing otherwise, and `generate` makes its own cache."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if num_beams > 1 or config is None or getattr(config, "is_encoder_decoder", False):
        return {}
    supports = getattr(base, "_supports_default_dynamic_cache", None)
    if supports is None or not supports():
        return {}
    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # a config transformers cannot lay a cache out for: leave it to generate
        return {}
    if any(type(layer) is not DynamicLayer for layer in layers):
        return {}  # sliding-window or other special layers
    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    return {name: Cache(layer_class_to_replicate=partial(ReservedLayer, reserve))}


def decoding_options(temperature: float, top_k: int | None, top_p: float | None, num_beams: int = 1) -> dict:
    """`generate` keyword arguments: greedy (or beam search) at temperature 0, sampling otherwise."""
    if temperature <= 0:
        return {"do_sample": False, "num_beams": num_beams}
    return {"do_sample": True, "num_beams": num_beams, "temperature": temperature, "top_k": top_k or 0,
            "top_p": top_p or 1.0}


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], *, max_new_tokens: int = 64, min_new_tokens: int = 0,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, num_beams: int = 1,
             repetition_penalty: float = 1.0, batch_size: int = 16, seed: int | None = None,
             streamer=None) -> list[str]:
    """Continue each prompt; returns the generated text only (without the prompt), special tokens dropped.

    `temperature` 0 means greedy decoding (or beam search with `num_beams` > 1). Prompts are
    left-padded in batches so that every row's new tokens start at the same position (an encoder-decoder's
    go to its encoder, right-padded). A `seed` makes sampling reproducible.
    """
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    options = decoding_options(temperature, top_k, top_p, num_beams)
    stops = stop_token_ids(tokenizer)  # EOS and the chat template's end-of-turn token, as saved models carry
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = encoded_prompts(model, tokenizer, prompts[start:start + batch_size], device)
            new = new_tokens(model, model.generate(**encoded, max_new_tokens=max_new_tokens,
                                                   min_new_tokens=min_new_tokens,
                                                   repetition_penalty=repetition_penalty,
                                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
                                                   streamer=streamer,
                                                   **reserved_cache(model, max_new_tokens, num_beams), **options),
                             encoded)
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs


class LengthSampler:
    """Draws each rollout batch's response length limit uniformly from [low, high] (both inclusive)."""

    def __init__(self, low: int, high: int):
        if low > high:
            raise ValueError(f"length sampler range is empty: min {low} > max {high}")
        self.low, self.high = low, high

    def __call__(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


def response_mask(response_ids: torch.Tensor, eos_token_id: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Which generated tokens belong to the response: everything up to and including the first stop token
    (`eos_token_id`: one id or several, such as EOS and the chat's end-of-turn token).

    Decided by position, not by token id, so padding that reuses the EOS id is never mistaken for
    content. `response_ids`: `[B, R]`. Returns (mask `[B, R]`, ended `[B]` = a stop token was emitted).
    """
    stops = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                         device=response_ids.device)
    is_eos = torch.isin(response_ids, stops)
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS tokens strictly before t
    return (eos_before == 0).long(), is_eos.any(dim=1)


@dataclass
class Rollout:
    """A batch of sampled responses, laid out for scoring the response tokens.

    `input_ids`, `attention_mask`, `loss_mask`: `[B, P + R]` (prompt left-padded to P, right-padded for an
    encoder-decoder, response right-padded to R; loss_mask marks the response tokens); `ended`: `[B]`.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    ended: torch.Tensor
    prompts: list[str]
    responses: list[str]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.loss_mask.sum(1)


@torch.no_grad()
def sample_rollouts(model: nn.Module, tokenizer, prompts: list[str], *, max_new_tokens: int,
                    min_new_tokens: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    repetition_penalty: float = 1.0) -> Rollout:
    """Sample one response per prompt with the KV cache (batched, left-padded prompts)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    encoded = encoded_prompts(model, tokenizer, prompts, device)
    sampling = decoding_options(temperature, top_k, top_p)
    try:
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                repetition_penalty=repetition_penalty, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=stop_token_ids(tokenizer), **reserved_cache(model, max_new_tokens),
                                **sampling)
    finally:
        model.train(was_training)
    return rollout_from(encoded, new_tokens(model, output, encoded), tokenizer, prompts)


def rollout_from(encoded: dict[str, torch.Tensor], response: torch.Tensor, tokenizer, prompts: list[str]) -> Rollout:
    """The `Rollout` of left-padded prompts `encoded` and the tokens generated after them `[B, R]`:
    everything after a row's first stop token (EOS or end of turn) becomes padding, and the responses are
    decoded."""
    mask, ended = response_mask(response, stop_token_ids(tokenizer))
    response = torch.where(mask.bool(), response, torch.full_like(response, tokenizer.pad_token_id))
    texts = tokenizer.batch_decode(response, skip_special_tokens=True)
    prompt_mask = encoded["attention_mask"]
    return Rollout(input_ids=torch.cat([encoded["input_ids"], response], 1),
                   attention_mask=torch.cat([prompt_mask, mask], 1),
                   loss_mask=torch.cat([torch.zeros_like(prompt_mask), mask], 1),
                   ended=ended, prompts=list(prompts), responses=texts)

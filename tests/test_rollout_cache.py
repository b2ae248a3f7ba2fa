"""The reserved key/value cache of rollouts: the same samples as transformers' dynamic cache, without its copies."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM

from tests.helpers import make_tiny_model_dir
from tunelab.rollout import ReservedLayer, left_padded, reserved_cache, sample_rollouts

PROMPTS = ["the cat sat", "a much longer prompt about the dog and the park", "hi"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    return AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


def _generate(model, tokenizer, seed, **extra):
    encoded = left_padded(tokenizer, PROMPTS, torch.device("cpu"))
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(**encoded, max_new_tokens=12, do_sample=True, temperature=1.0, top_k=0,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **extra)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_reserved_cache_samples_what_the_dynamic_cache_samples(tiny, seed):
    model, tokenizer = tiny
    options = reserved_cache(model, 12)
    assert len(options) == 1, "a plain Llama gets the reserved cache"
    cache = next(iter(options.values()))
    reserved = _generate(model, tokenizer, seed, **options)
    assert torch.equal(reserved, _generate(model, tokenizer, seed))
    layer = cache.layers[0]
    assert isinstance(layer, ReservedLayer)
    # one buffer for the whole generation: the prompt plus the reserve; the last step's states were written
    # into it, not concatenated
    assert layer._keys.shape[-2] == left_padded(tokenizer, PROMPTS, torch.device("cpu"))["input_ids"].shape[1] + 12
    assert layer.keys.data_ptr() == layer._keys.data_ptr()


def test_a_full_buffer_grows_and_replaced_states_start_a_new_one():
    layer = ReservedLayer(reserve=2)
    first = torch.randn(1, 2, 3, 4)
    layer.update(first, first + 1)
    assert layer._keys.shape[-2] == 5
    steps = [torch.randn(1, 2, 1, 4) for _ in range(3)]  # the third does not fit: a new buffer
    for step in steps:
        keys, values = layer.update(step, step + 1)
    expected = torch.cat([first, *steps], dim=-2)
    assert torch.equal(keys, expected) and torch.equal(values, expected + 1)
    assert layer._keys.shape[-2] == 6 + 2
    layer.batch_select_indices(torch.tensor([0]))  # replaces the states from outside (as beam search does)
    keys, _ = layer.update(steps[0], steps[0])
    assert torch.equal(keys, torch.cat([expected, steps[0]], dim=-2))


def test_models_with_special_cache_layers_and_beam_search_keep_transformers_cache(tiny):
    model, _ = tiny
    assert reserved_cache(model, 8, num_beams=2) == {}
    shape = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1)
    assert len(reserved_cache(MistralForCausalLM(MistralConfig(**shape, sliding_window=None)), 8)) == 1
    sliding = MistralForCausalLM(MistralConfig(**shape, sliding_window=4))
    assert reserved_cache(sliding, 8) == {}


def test_rollouts_are_unchanged_by_the_reserved_cache(tiny, monkeypatch):
    model, tokenizer = tiny
    torch.manual_seed(3)
    reserved = sample_rollouts(model, tokenizer, PROMPTS, max_new_tokens=10, temperature=0.8)
    import tunelab.rollout as rollout

    monkeypatch.setattr(rollout, "reserved_cache", lambda *args, **kwargs: {})
    torch.manual_seed(3)
    plain = sample_rollouts(model, tokenizer, PROMPTS, max_new_tokens=10, temperature=0.8)
    assert torch.equal(reserved.input_ids, plain.input_ids) and reserved.responses == plain.responses

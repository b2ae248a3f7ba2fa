"""Packed preference pairs: layout, the same scores and gradients as one row per side, and the same training."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, BloomConfig, BloomForCausalLM, LlamaConfig,
                          LlamaForCausalLM, LlamaForSequenceClassification, MistralConfig, MistralForCausalLM)

from tests.helpers import make_tiny_model_dir, max_weight_diff, write_jsonl
from tests.recipes.test_dpo import dpo_config
from tests.recipes.test_reward import review_pairs, rm_config
from tunelab.data.batching import pad_batch
from tunelab.logprobs import LogprobModel
from tunelab.recipes.dpo import run_dpo
from tunelab.recipes.reward import run_rm
from tunelab.rewards import packed_pair_scores, sequence_scores
from tunelab.shared_prefix import common_prefix, pack_pairs, packed_length, shared_prefix_mask, unshared_reason


def test_common_prefix_leaves_each_side_its_last_token():
    assert common_prefix([1, 2, 3, 4], [1, 2, 5]) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 2  # one side a prefix of the other: it keeps its last token
    assert common_prefix([7, 2], [8, 2]) == 0
    assert common_prefix([5, 6, 7], [5, 6, 7]) == 2
    assert packed_length([1, 2, 3, 4], [1, 2, 5]) == 5


def test_pack_pairs_layout_and_mask():
    batch = pack_pairs([([1, 2, 3, 4, 5], [1, 2, 3, 9]), ([6, 7], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 9], [6, 7, 8, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 0, 0, 0, 0]]
    assert batch["segments"].tolist() == [[0, 0, 0, 1, 1, 2], [1, 1, 2, 3, 3, 3]]
    assert batch["chosen_end"].tolist() == [4, 1] and batch["rejected_end"].tolist() == [5, 2]
    assert (batch["segments"] == 0).sum(1).tolist() == [3, 0]  # the prefix lengths
    mask = shared_prefix_mask(batch["segments"], "sdpa", torch.float32)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    # the rejected token (column 5) sees the prefix and itself, not the chosen continuation
    assert mask[0, 0, 5].tolist() == [True, True, True, False, False, True]
    assert mask[0, 0, 4].tolist() == [True, True, True, True, True, False]
    assert mask[1, 0, 2].tolist() == [False, False, True, False, False, False]
    additive = shared_prefix_mask(batch["segments"], "eager", torch.float32)
    assert (additive == 0).equal(mask) and additive.min() == torch.finfo(torch.float32).min


def random_pairs(seed: int, n: int = 7, vocab: int = 50) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prefix = [rng.randrange(1, vocab) for _ in range(rng.randrange(0, 9))]
        pairs.append((prefix + [rng.randrange(1, vocab) for _ in range(rng.randrange(1, 7))],
                      prefix + [rng.randrange(1, vocab) for _ in range(rng.randrange(1, 7))]))
    return pairs + [([1, 2, 3], [1, 2, 3, 4]), ([5, 6, 7, 8], [5, 6, 7, 9])]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_scores_and_gradients_equal_one_row_per_side(implementation):
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, num_labels=1,
                         attn_implementation=implementation)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    assert unshared_reason(model) is None
    pairs = random_pairs(0)
    sides = [a for a, _ in pairs] + [b for _, b in pairs]
    padded = pad_batch(sides, [[0] * len(s) for s in sides], 0)
    packed = pack_pairs(pairs, 0)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()

    def scores_and_grads(fn):
        model.zero_grad()
        scores = fn()
        (scores * torch.linspace(-1, 1, scores.numel())).sum().backward()
        return scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, plain_grads = scores_and_grads(lambda: sequence_scores(model, padded["input_ids"],
                                                                  padded["attention_mask"]))
    shared, shared_grads = scores_and_grads(lambda: packed_pair_scores(
        model, packed["input_ids"], packed["position_ids"], packed["segments"], packed["chosen_end"],
        packed["rejected_end"]))
    assert shared.tolist() == pytest.approx(plain.tolist(), abs=1e-5)
    assert plain.std() > 1e-3  # the scores differ from row to row: the comparison means something
    for name, grad in plain_grads.items():
        assert torch.allclose(shared_grads[name], grad, atol=1e-5, rtol=1e-4), name


def test_models_that_cannot_take_packed_pairs_are_recognised():
    llama = LlamaForSequenceClassification(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=4, num_labels=1))
    bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=4, intermediate_size=64, num_labels=1))
    assert unshared_reason(llama) is None and unshared_reason(bert) == "an encoder"
    llama.config._attn_implementation = "flash_attention_2"  # takes no custom 4D mask
    assert unshared_reason(llama) == "flash_attention_2 attention, which takes no custom mask"
    mistral = MistralForCausalLM(MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, sliding_window=8))
    assert unshared_reason(mistral) == "sliding-window attention layers"  # the custom mask would replace its sliding window
    mistral.config.sliding_window = None
    assert unshared_reason(mistral) is None
    bloom = BloomForCausalLM(BloomConfig(vocab_size=50, hidden_size=32, n_layer=1, n_head=4))
    assert unshared_reason(bloom) == "positions not taken from position_ids (ALiBi)"  # ALiBi: positions from the columns, not position_ids


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("packed") / "model")


def logged_losses(run_dir) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines if "split" not in m and "loss" in m]


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_reward_training_with_shared_prefix_matches_one_row_per_side(tiny_dir, tmp_path, peft):
    data = write_jsonl(tmp_path / "pairs.jsonl", review_pairs(48))
    runs = {}
    for share in (True, False):
        config = rm_config(tiny_dir, data, tmp_path / f"rm-{share}", max_steps=4, log_every=1)
        config.peft, config.reward.share_prefix = peft, share
        config.lora.dropout = 0.0  # dropout draws its masks by tensor shape: packed rows would get other masks
        runs[share] = run_rm(config, quiet=True)
    losses = {share: logged_losses(result.run_dir) for share, result in runs.items()}
    assert len(losses[True]) == 4 and losses[True] == pytest.approx(losses[False], abs=1e-5)
    assert losses[True][-1] != pytest.approx(losses[True][0], abs=1e-4)  # it trained
    assert runs[True].train.eval_metrics["accuracy"] == pytest.approx(runs[False].train.eval_metrics["accuracy"])
    # AdamW divides each gradient by its own scale, so float-level differences of near-zero gradients show up
    # in the weights as a fraction of the step size; a real difference moves them by whole steps
    assert max_weight_diff(runs[True].run_dir, runs[False].run_dir) < 0.25 * config.train.lr


def test_prompt_tuning_reward_model_falls_back_to_one_row_per_side(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", review_pairs(24))
    config = rm_config(tiny_dir, data, tmp_path / "rm", max_steps=2, log_every=1)
    config.peft = "prompt"
    result = run_rm(config)
    assert "reward.share_prefix does not apply to this model (a soft prompt" in capsys.readouterr().err
    assert len(logged_losses(result.run_dir)) == 2


def test_packed_log_probs_equal_one_row_per_side_with_scored_tokens_in_the_prefix():
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    rng = random.Random(3)
    pairs, masks = [], []
    for prompt_len, shared_answer in [(5, 0), (3, 2), (0, 0), (6, 1), (1, 3)]:
        prompt = [rng.randrange(1, 50) for _ in range(prompt_len)]
        answer = [rng.randrange(1, 50) for _ in range(shared_answer)]  # completions that start alike
        a = prompt + answer + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 6))]
        b = prompt + answer + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 6))]
        if a == b:
            b = b + [7]
        pairs.append((a, b))
        masks.append(([0] * prompt_len + [1] * (len(a) - prompt_len), [0] * prompt_len + [1] * (len(b) - prompt_len)))
    packed = pack_pairs(pairs, 0, masks)
    assert int(packed["chosen_mask"].sum() + packed["rejected_mask"].sum()) == sum(sum(m) + sum(n) for m, n in masks)
    sides = [a for a, _ in pairs] + [b for _, b in pairs]
    padded = pad_batch(sides, [m for m, _ in masks] + [n for _, n in masks], 0)
    module = LogprobModel(model)

    def logps_and_grads(fn):
        model.zero_grad()
        logps = fn()
        (logps * torch.linspace(-1, 1, logps.numel())).sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, plain_grads = logps_and_grads(lambda: module(padded["input_ids"], padded["attention_mask"],
                                                        padded["loss_mask"]).sum(-1))
    shared, shared_grads = logps_and_grads(lambda: module(packed["input_ids"], **{
        k: packed[k] for k in ("position_ids", "segments", "chosen_mask", "rejected_mask", "parent")}))
    assert shared.tolist() == pytest.approx(plain.tolist(), abs=1e-4)
    assert float(plain.std()) > 1.0
    for name, grad in plain_grads.items():
        assert torch.allclose(shared_grads[name], grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("peft,loss,precompute", [("none", "sigmoid", False), ("lora", "sigmoid", False),
                                                  ("lora", "ipo", True), ("none", "simpo", False)])
def test_dpo_with_shared_prefix_matches_one_row_per_side(tiny_dir, tmp_path, peft, loss, precompute):
    data = write_jsonl(tmp_path / "pairs.jsonl", review_pairs(40))
    runs = {}
    for share in (True, False):
        config = dpo_config(tiny_dir, data, tmp_path / f"dpo-{share}", peft=peft, max_steps=3)
        config.dpo.share_prefix, config.dpo.loss, config.dpo.precompute_ref = share, loss, precompute
        config.lora.dropout = 0.0  # as in the reward test
        runs[share] = run_dpo(config, quiet=True)
    losses = {share: logged_losses(result.run_dir) for share, result in runs.items()}
    assert len(losses[True]) == 3 and losses[True] == pytest.approx(losses[False], abs=1e-4)
    assert losses[True][-1] != pytest.approx(losses[True][0], abs=1e-5)  # it trained
    held = {share: result.train.eval_metrics for share, result in runs.items()}
    assert held[True]["reward_margin"] == pytest.approx(held[False]["reward_margin"], abs=1e-4)
    assert max_weight_diff(runs[True].run_dir, runs[False].run_dir) < 0.25 * config.train.lr  # see the RM test


def test_prompt_tuning_dpo_falls_back_to_one_row_per_side(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", review_pairs(24))
    config = dpo_config(tiny_dir, data, tmp_path / "dpo", peft="prompt", max_steps=2)
    result = run_dpo(config)
    assert "dpo.share_prefix does not apply to this model (a soft prompt" in capsys.readouterr().err
    assert len(logged_losses(result.run_dir)) == 2

"""Encoder-decoder models (T5, BART) through the shared log-prob interface and every recipe.

The models are tiny and random (d_model 32, 2 layers); a copy task (the completion repeats the prompt's words)
is learnt in a few dozen full fine-tuning steps at a high learning rate, which a random model this small
needs to move at all and stays stable with: the tests check that training moves the model the right way,
not how well it ends up.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import write_jsonl
from tests.seq2seq_models import copy_rows, make_tiny_seq2seq_dir
from tunelab.config import DataConfig, DataSource, ModelConfig, SFTConfig, TrainConfig
from tunelab.data.batching import pad_batch
from tunelab.data.load import DataError
from tunelab.logprobs import split_for_encoder_decoder, token_logprobs
from tunelab.modeling import load_for_inference, load_lm


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return make_tiny_seq2seq_dir(tmp_path_factory.mktemp("t5") / "model", "t5")


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    return make_tiny_seq2seq_dir(tmp_path_factory.mktemp("bart") / "model", "bart")


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "copy.jsonl", copy_rows(160, seed=1))


def sft_config(model_dir, data, output, peft="none", **train) -> SFTConfig:
    defaults = dict(lr=3e-3, batch_size=16, warmup_ratio=0.0, log_every=5, seed=0, report=False, max_steps=60)
    return SFTConfig(model=ModelConfig(name_or_path=str(model_dir)), output=str(output), peft=peft,
                     data=DataConfig(sources=[DataSource(path=str(data))], max_length=64, eval_fraction=0.1),
                     train=TrainConfig(**{**defaults, **train}))


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_logprobs_match_the_models_own_forward(kind, t5_dir, bart_dir):
    """Rows laid out [prompt | target] give the log-probs of the model's own teacher-forced forward."""
    model = load_lm(ModelConfig(name_or_path=str(t5_dir if kind == "t5" else bart_dir))).eval()
    rows = [([5, 6, 7], [8, 9, 2]), ([5, 6], [10, 11, 12, 2])]
    batch = pad_batch([p + t for p, t in rows], [[0] * len(p) + [1] * len(t) for p, t in rows], 0)
    logprobs = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    for i, (prompt, target) in enumerate(rows):
        logits = model(input_ids=torch.tensor([prompt]), labels=torch.tensor([target])).logits[0]
        expected = F.log_softmax(logits.float(), -1).gather(1, torch.tensor(target)[:, None]).squeeze(1)
        assert torch.allclose(logprobs[i][batch["loss_mask"][i].bool()], expected, atol=1e-5)
        assert float(logprobs[i][~batch["loss_mask"][i].bool()].abs().sum()) == 0.0


def test_encoder_tokens_never_carry_loss():
    """The split: prompt tokens (left padding or right, as sampling and training lay them out) are the
    encoder's; the decoder's targets are exactly the scored tokens, in order."""
    input_ids = torch.tensor([[0, 0, 5, 6, 8, 9], [5, 6, 7, 8, 0, 0]])
    attention = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    loss_mask = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 0, 0]])
    layout = split_for_encoder_decoder(input_ids, attention, loss_mask)
    assert layout["encoder_ids"].tolist() == [[5, 6, 0], [5, 6, 7]]
    assert layout["encoder_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert layout["targets"].tolist() == [[8, 9], [8, 0]]
    assert layout["target_mask"].tolist() == [[1, 1], [1, 0]]
    assert layout["target_columns"][0].tolist() == [4, 5]


def held_out_nll(model_dir, rows, tokenizer) -> float:
    from tunelab.evaluation import perplexity

    model, _ = load_for_inference(str(model_dir))
    return math.log(perplexity(model, rows, tokenizer.pad_token_id))


def exact_copies(model_dir, rows) -> float:
    from tunelab.rollout import generate

    model, tokenizer = load_for_inference(str(model_dir))
    outputs = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=6)
    return sum(out.strip() == r["completion"].strip() for out, r in zip(outputs, rows)) / len(rows)


@pytest.fixture(scope="module")
def t5_sft(t5_dir, copy_data, tmp_path_factory):
    from tunelab.recipes.sft import run_sft

    run = tmp_path_factory.mktemp("sft") / "run"
    return run_sft(sft_config(t5_dir, copy_data, run, lr=3e-3, max_steps=250, log_every=50), quiet=True)


def test_sft_learns_the_copy_task(t5_dir, t5_sft, copy_data):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(t5_dir)
    held = t5_sft.data.held_out
    before = held_out_nll(t5_dir, held, tokenizer)
    assert t5_sft.train.eval_metrics["loss"] < before - 2.0, (before, t5_sft.train.eval_metrics)
    rows = copy_rows(20, seed=7)  # prompts the run never saw
    assert exact_copies(t5_dir, rows) == 0.0
    assert exact_copies(t5_sft.final_dir, rows) >= 0.4
    # final/ is a plain transformers model
    plain = AutoModelForSeq2SeqLM.from_pretrained(t5_sft.final_dir)
    assert type(plain).__name__ == "T5ForConditionalGeneration"


def test_sft_rows_put_the_prompt_on_the_encoder(t5_sft):
    """Each row: the prompt (its tokens carry no loss) then the completion and EOS, all trained."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(t5_sft.final_dir)
    row = t5_sft.data.train[0]
    first = row.mask.index(1)
    assert tokenizer.decode(row.ids[:first], skip_special_tokens=True).startswith("copy: ")
    assert all(row.mask[first:]) and row.ids[-1] == tokenizer.eos_token_id
    batch = pad_batch([row.ids], [row.mask], tokenizer.pad_token_id)
    layout = split_for_encoder_decoder(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    assert layout["encoder_ids"][0].tolist() == row.ids[:first]
    assert layout["targets"][0].tolist() == row.ids[first:]


def test_text_rows_are_refused_for_an_encoder_decoder(t5_dir, tmp_path):
    from tunelab.recipes.sft import run_sft

    data = write_jsonl(tmp_path / "text.jsonl", [{"text": "red green blue"}] * 4)
    with pytest.raises(DataError, match="'text' rows have no prompt for the encoder"):
        run_sft(sft_config(t5_dir, data, tmp_path / "run"), quiet=True)
    assert not (tmp_path / "run").exists()


def test_lora_on_t5_targets_attention_and_loads_with_plain_peft(t5_dir, copy_data, tmp_path):
    """LoRA's default on T5 is its attention projections by their own names (recorded in config.yaml); final/
    loads with AutoPeftModelForSeq2SeqLM, and `merge` writes a standalone model that scores as the adapter."""
    import yaml
    from peft import AutoPeftModelForSeq2SeqLM
    from transformers import AutoModelForSeq2SeqLM

    from tunelab.modeling import merge_adapter
    from tunelab.recipes.sft import run_sft

    result = run_sft(sft_config(t5_dir, copy_data, tmp_path / "run", peft="lora", lr=1e-2, max_steps=20), quiet=True)
    adapter = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_2_SEQ_LM" and sorted(adapter["target_modules"]) == ["q", "v"]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["lora"]["target_modules"] == ["q", "v"]
    peft_model = AutoPeftModelForSeq2SeqLM.from_pretrained(result.final_dir).eval()
    merged_dir = merge_adapter(str(tmp_path / "run"), str(tmp_path / "merged"))
    merged = AutoModelForSeq2SeqLM.from_pretrained(merged_dir).eval()
    assert not (merged_dir / "adapter_config.json").exists()
    # the model cards load them with the Seq2SeqLM classes
    assert "AutoPeftModelForSeq2SeqLM.from_pretrained" in (result.final_dir / "README.md").read_text()
    assert "AutoModelForSeq2SeqLM.from_pretrained" in (merged_dir / "README.md").read_text()
    ids, labels = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10, 2]])
    with torch.no_grad():
        a = peft_model(input_ids=ids, labels=labels).logits
        b = merged(input_ids=ids, labels=labels).logits
        base = AutoModelForSeq2SeqLM.from_pretrained(t5_dir)(input_ids=ids, labels=labels).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert (a - base).abs().max() > 1e-3  # the adapter changed something


def test_lora_all_linear_and_prompt_tuning_on_bart(bart_dir, copy_data, tmp_path):
    from tunelab.recipes.sft import run_sft

    config = sft_config(bart_dir, copy_data, tmp_path / "lora", peft="lora", max_steps=3)
    config.lora.target_modules = "all-linear"
    run_sft(config, quiet=True)
    modules = json.loads((tmp_path / "lora" / "final" / "adapter_config.json").read_text())["target_modules"]
    assert {"fc1", "fc2", "q_proj", "out_proj"} <= set(modules)
    prompt = run_sft(sft_config(bart_dir, copy_data, tmp_path / "prompt", peft="prompt", lr=3e-2, max_steps=30),
                     quiet=True)
    assert json.loads((prompt.final_dir / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    history = [json.loads(line) for line in (tmp_path / "prompt" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in history if "loss" in m and m.get("split") is None]
    assert losses[-1] < losses[0]
    model, tokenizer = load_for_inference(str(prompt.final_dir))
    from tunelab.rollout import generate

    assert len(generate(model, tokenizer, ["copy: red cat"], max_new_tokens=4)) == 1


def test_generate_returns_only_new_text(t5_dir):
    """The decoder's output holds only new tokens (after its start token): nothing of the prompt is cut."""
    from tunelab.rollout import generate

    model, tokenizer = load_for_inference(str(t5_dir))
    prompts = ["copy: red", "copy: green blue moon tree"]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=5)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    raw = model.generate(**encoded, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    assert outputs == tokenizer.batch_decode(raw[:, 1:], skip_special_tokens=True)
    assert all(out for out in outputs)


def test_inspect_shows_encoder_input_and_decoder_tokens(t5_dir, copy_data, capsys):
    from tunelab.cli import main

    assert main(["inspect", "--model", str(t5_dir), "--data", str(copy_data), "--n", "1", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "encoder input (" in out and "decoder (" in out
    decoder_line = next(line for line in out.splitlines() if line.startswith("decoder ("))
    assert "[[" in decoder_line and "copy:" not in decoder_line


def test_eval_reports_rouge_perplexity_and_kl_on_an_encoder_decoder(t5_dir, t5_sft, tmp_path):
    """`tunelab eval`: the trained model's ROUGE on held-out copies beats the base model's, its perplexity of
    the references is lower, and its KL to the base is positive (to itself: zero)."""
    from tunelab.evaluation import run_eval

    data = write_jsonl(tmp_path / "eval.jsonl", copy_rows(12, seed=9))
    trained = run_eval(str(t5_sft.final_dir), str(data), reference=str(t5_dir))
    base = run_eval(str(t5_dir), str(data), reference=str(t5_dir))
    assert trained["rougeL"] > base["rougeL"] + 0.2, (trained["rougeL"], base["rougeL"])
    assert trained["perplexity"] < base["perplexity"] / 4
    assert trained["kl"] > 0.1 and abs(base["kl"]) < 1e-5
    assert all(not g["response"].startswith("copy:") for g in trained["generations"])


@pytest.mark.parametrize("peft,mode", [("none", "from the starting weights"), ("lora", "adapter disabled"),
                                       ("lora", "frozen copy")])
def test_dpo_learns_the_preferred_side_on_held_out_pairs(t5_dir, peft, mode, tmp_path):
    """Every reference mode: full fine-tuning (reference log-probs from the start), LoRA with its adapter
    disabled, and a separate frozen copy (here the same weights saved apart, precomputed then freed)."""
    import shutil

    from tests.seq2seq_models import preference_rows
    from tunelab.config import DPOConfig
    from tunelab.recipes.dpo import run_dpo

    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(120, seed=3))
    ref = None
    if mode == "frozen copy":
        ref = str(shutil.copytree(t5_dir, tmp_path / "ref"))
    config = DPOConfig(model=ModelConfig(name_or_path=str(t5_dir)), output=str(tmp_path / "run"), peft=peft, ref=ref,
                       data=DataConfig(sources=[DataSource(path=str(data))], max_length=64, eval_fraction=0.2),
                       train=TrainConfig(lr=3e-3 if peft == "none" else 3e-2, batch_size=16, max_steps=25,
                                         warmup_ratio=0.0, log_every=5, seed=0, report=False))
    config.dpo.beta = 0.5
    config.dpo.precompute_ref = mode == "frozen copy"
    result = run_dpo(config, quiet=True)
    held = result.train.eval_metrics
    assert held["reward_accuracy"] >= 0.8 and held["reward_margin"] > 0.5, held
    assert {"none": "precomputed from the starting weights", "lora": "adapter disabled"}.get(
        peft if mode != "frozen copy" else "", "precomputed (frozen copy") in result.reference


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_reward_model_on_an_encoder_decoder_beats_chance(kind, t5_dir, bart_dir, tmp_path):
    """transformers' sequence-classification class of the family (the decoder's state at EOS, a one-output head)
    trained with Bradley-Terry: held-out accuracy above chance, and the scorer reads final/ back."""
    from transformers import AutoModelForSequenceClassification

    from tests.seq2seq_models import preference_rows
    from tunelab.config import RMConfig
    from tunelab.recipes.reward import run_rm
    from tunelab.rewards import RewardScorer

    model_dir = t5_dir if kind == "t5" else bart_dir
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(120, seed=4))
    config = RMConfig(model=ModelConfig(name_or_path=str(model_dir)), output=str(tmp_path / "rm"), peft="none",
                      data=DataConfig(sources=[DataSource(path=str(data))], max_length=64, eval_fraction=0.2),
                      train=TrainConfig(lr=3e-3, batch_size=16, max_steps=80 if kind == "t5" else 150,
                                        warmup_ratio=0.0, log_every=20, seed=0,
                                        report=False))
    result = run_rm(config, quiet=True)
    assert result.train.eval_metrics["accuracy"] >= 0.75, result.train.eval_metrics
    plain = AutoModelForSequenceClassification.from_pretrained(result.final_dir)
    assert plain.config.num_labels == 1 and plain.config.is_encoder_decoder
    rows = preference_rows(40, seed=11)  # pairs the run never saw
    scorer = RewardScorer(result.final_dir)
    chosen = scorer.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = scorer.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert sum(c > r for c, r in zip(chosen, rejected)) >= 28


def test_value_head_reads_the_decoder_states_at_response_tokens(t5_dir):
    from tunelab.recipes.ppo import PolicyWithValueHead

    policy = load_lm(ModelConfig(name_or_path=str(t5_dir))).eval()
    module = PolicyWithValueHead(policy).eval()
    ids = torch.tensor([[0, 5, 6, 2, 8, 9, 10], [5, 6, 7, 2, 8, 9, 0]])
    attention = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]])  # left-padded prompt, short response
    loss_mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0]])
    logprobs, values, entropy = module(ids, attention, loss_mask)
    for tensor in (logprobs, values, entropy):
        assert tensor.shape == (2, 7) and (tensor[~loss_mask.bool()] == 0).all()
    assert (logprobs[loss_mask.bool()] < 0).all() and (entropy[loss_mask.bool()] > 0).all()
    assert torch.allclose(logprobs, token_logprobs(policy, ids, attention, loss_mask), atol=1e-6)
    # the value of a response token comes from the decoder state before it: the same for a row's shared prefix
    with torch.no_grad():
        decoder = policy.get_decoder()(input_ids=torch.tensor([[0, 8, 9]]), encoder_hidden_states=policy.get_encoder()(
            input_ids=torch.tensor([[5, 6, 2]])).last_hidden_state).last_hidden_state
        expected = module.value_head(decoder[0]).squeeze(-1)
    assert torch.allclose(values[0, 4:], expected, atol=1e-5)


def ppo_config(model_dir, prompts, output, peft="none", **train):
    from tunelab.config import PPOConfig

    config = PPOConfig(model=ModelConfig(name_or_path=str(model_dir)), output=str(output), peft=peft,
                       data=DataConfig(sources=[DataSource(path=str(prompts))], eval_fraction=0.0),
                       train=TrainConfig(**{**dict(lr=3e-3, batch_size=16, max_steps=25, warmup_ratio=0.0,
                                                   log_every=5, report=False), **train}))
    config.ppo.kl_coef = 0.05
    config.reward.source = "tests.seq2seq_models:cat_reward"
    config.generation.max_new_tokens = 4
    config.ppo.minibatch_size = 8
    config.ppo.sample_every = 0
    return config


@pytest.fixture(scope="module")
def ppo_prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("ppo") / "prompts.jsonl", [{"prompt": r["prompt"]}
                                                                          for r in copy_rows(48, seed=5)])


def test_ppo_raises_a_callable_reward_with_bounded_kl_and_an_untouched_reference(t5_sft, ppo_prompts, tmp_path,
                                                                              monkeypatch):
    """PPO from the copy-task SFT model (whose copies hold 'cat' about one word in eight) with a reward that pays
    for 'cat': the score rises, the KL stays bounded, and the frozen reference keeps the starting weights."""
    from safetensors.torch import load_file

    import tunelab.recipes.ppo as ppo_module
    from tunelab.recipes.ppo import run_ppo

    references = []

    def keep(config):
        references.append(frozen(config))
        return references[-1]
    frozen = ppo_module.frozen_reference
    monkeypatch.setattr(ppo_module, "frozen_reference", keep)
    start = t5_sft.final_dir
    result = run_ppo(ppo_config(start, ppo_prompts, tmp_path / "run", lr=1e-3, max_steps=30), quiet=True)
    history = result.history
    first = sum(h["score_mean"] for h in history[:5]) / 5
    last = sum(h["score_mean"] for h in history[-5:]) / 5
    assert last > first + 1.0, (first, last)
    assert max(h["kl"] for h in history) < 20  # the penalty holds the policy within reach of the reference
    assert {"kl", "explained_variance", "value_loss", "eos_rate", "response_length"} <= history[-1].keys()
    original = load_file(start / "model.safetensors")
    (reference,) = references
    assert all(torch.equal(reference.state_dict()[k], v) for k, v in original.items() if k in reference.state_dict())
    from transformers import AutoModelForSeq2SeqLM

    assert AutoModelForSeq2SeqLM.from_pretrained(result.final_dir).config.is_encoder_decoder


def test_ppo_with_lora_uses_the_disabled_adapter_as_reference(t5_dir, ppo_prompts, tmp_path, capsys):
    from peft import AutoPeftModelForSeq2SeqLM

    from tunelab.recipes.ppo import run_ppo

    result = run_ppo(ppo_config(t5_dir, ppo_prompts, tmp_path / "run", peft="lora", lr=3e-2, max_steps=4),
                     quiet=True)
    assert "adapter disabled" in capsys.readouterr().err
    assert abs(result.history[0]["kl"]) < 1e-4  # the first rollout: policy == reference
    assert all(math.isfinite(h["value_loss"]) for h in result.history)
    assert type(AutoPeftModelForSeq2SeqLM.from_pretrained(result.final_dir).get_base_model()).__name__ == \
        "T5ForConditionalGeneration"


def test_ppo_on_t5_against_a_classifier_label_through_pipeline(t5_dir, ppo_prompts, tmp_path):
    """The course lab's reward: a text-classification pipeline's probability of one label (`reward.label`)."""
    from transformers import AutoTokenizer, T5Config, T5ForSequenceClassification

    from tunelab.recipes.ppo import run_ppo
    from tunelab.rewards import load_reward_fn

    tokenizer = AutoTokenizer.from_pretrained(t5_dir)
    config = T5Config.from_pretrained(t5_dir, num_labels=2, id2label={0: "hate", 1: "nothate"},
                                      label2id={"hate": 0, "nothate": 1})
    torch.manual_seed(1)
    classifier_dir = tmp_path / "classifier"
    classifier = T5ForSequenceClassification(config).eval()
    classifier.save_pretrained(classifier_dir)
    tokenizer.save_pretrained(classifier_dir)
    reward = load_reward_fn(f"pipeline:{classifier_dir}", label="nothate")
    scores = reward(["copy: red cat"], [" red cat"])
    with torch.no_grad():
        logits = classifier(**tokenizer(["copy: red cat red cat"], return_tensors="pt")).logits
    assert scores[0] == pytest.approx(float(logits.softmax(-1)[0, 1]), abs=1e-5)

    ppo = ppo_config(t5_dir, ppo_prompts, tmp_path / "run", peft="lora", max_steps=2)
    ppo.reward.source, ppo.reward.label = f"pipeline:{classifier_dir}", "nothate"
    result = run_ppo(ppo, quiet=True)
    assert all(0 < h["score_mean"] < 1 for h in result.history)


def test_grpo_on_t5_raises_the_reward(t5_sft, ppo_prompts, tmp_path):
    """Critic-free RL samples and scores through the same rollout and log-prob code."""
    from tunelab.config import GRPOConfig
    from tunelab.recipes.grpo import run_group_rl

    config = GRPOConfig(model=ModelConfig(name_or_path=str(t5_sft.final_dir)), output=str(tmp_path / "run"),
                        peft="none", data=DataConfig(sources=[DataSource(path=str(ppo_prompts))], eval_fraction=0.0),
                        train=TrainConfig(lr=2e-3, batch_size=8, max_steps=30, warmup_ratio=0.0, log_every=10,
                                          report=False))
    config.reward.source = "tests.seq2seq_models:cat_reward"
    config.generation.max_new_tokens = 4
    config.rl.sample_every = 0
    history = run_group_rl(config, quiet=True).history
    first = sum(h["score_mean"] for h in history[:5]) / 5
    last = sum(h["score_mean"] for h in history[-5:]) / 5
    assert last > first + 0.5, (first, last)
    assert all(h["kl"] < 25 for h in history), [h["kl"] for h in history]


def test_kto_on_t5_separates_desirable_from_undesirable(t5_dir, tmp_path):
    from tests.seq2seq_models import preference_rows
    from tunelab.config import KTOConfig
    from tunelab.recipes.kto import run_kto

    rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in preference_rows(80, seed=6) for side in ("chosen", "rejected")]
    data = write_jsonl(tmp_path / "feedback.jsonl", rows)
    config = KTOConfig(model=ModelConfig(name_or_path=str(t5_dir)), output=str(tmp_path / "run"), peft="lora",
                       data=DataConfig(sources=[DataSource(path=str(data))], max_length=64, eval_fraction=0.2),
                       train=TrainConfig(lr=3e-2, batch_size=16, max_steps=25, warmup_ratio=0.0, log_every=5, seed=0,
                                         report=False))
    held = run_kto(config, quiet=True).train.eval_metrics
    assert held["reward_desirable"] > held["reward_undesirable"] + 0.5, held


def test_chat_streams_only_the_decoders_reply(t5_sft):
    """`tunelab chat` on an encoder-decoder: the streamed reply is the generated text, with nothing of the prompt
    (the streamer's first, skipped, chunk is the decoder's start token)."""
    import io

    from tunelab.data.templates import render_chat
    from tunelab.generation import GenerationOptions, chat_loop
    from tunelab.rollout import generate

    stdout = io.StringIO()
    options = GenerationOptions(max_new_tokens=6)
    assert chat_loop(str(t5_sft.final_dir), options, stdin=io.StringIO("copy: red cat\n/exit\n"), stdout=stdout) == 1
    streamed = stdout.getvalue().split("model> ")[1].split("\nyou> ")[0]
    model, tokenizer = load_for_inference(str(t5_sft.final_dir))
    prompt = render_chat(tokenizer, tokenizer.chat_template, [{"role": "user", "content": "copy: red cat"}], True)
    assert streamed == generate(model, tokenizer, [prompt], max_new_tokens=6)[0]
    assert streamed.strip() and "copy" not in streamed and "user" not in streamed


def test_alpaca_and_messages_rows_split_at_the_reply(t5_dir, tmp_path):
    """Alpaca rows: the templated instruction is the encoder's input. Messages rows (the chat template): the
    conversation up to the assistant's turn is, and the reply with the template's end of turn is trained."""
    from transformers import AutoTokenizer

    from tunelab.data.dataset import prepare_sft_data

    tokenizer = AutoTokenizer.from_pretrained(t5_dir)
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "copy: red cat", "output": " red cat"}] * 3)
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "copy: sun"},
                                                               {"role": "assistant", "content": "sun"}]}] * 3)
    for path, source_text, target_text in ((alpaca, "### Instruction:\ncopy: red cat", " red cat</s>"),
                                            (chat, "<|im_start|>user\ncopy: sun<|im_end|>", "sun<|im_end|>")):
        config = DataConfig(sources=[DataSource(path=str(path))], eval_fraction=0.0)
        row = prepare_sft_data(config, tokenizer, encoder_decoder=True).train[0]
        first = row.mask.index(1)
        assert source_text in tokenizer.decode(row.ids[:first])
        assert tokenizer.decode([t for t, m in zip(row.ids, row.mask) if m]).startswith(target_text)
    config = DataConfig(sources=[DataSource(path=str(alpaca))], train_on_prompt=True)
    with pytest.raises(DataError, match="train_on_prompt cannot be used with an encoder-decoder"):
        prepare_sft_data(config, tokenizer, encoder_decoder=True)

"""What a run writes works outside tunelab: stop tokens in generation_config, reward scores that plain
transformers reproduce, loadable checkpoints and a model card."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import make_tiny_model_dir, write_jsonl
from tunelab.config import DataConfig, DataSource, ModelConfig, SFTConfig, TrainConfig
from tunelab.recipes.sft import run_sft

REPLY = "Sure."


def chat_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Say something about item {i}."},
                          {"role": "assistant", "content": REPLY}]} for i in range(n)]


def chat_config(model_dir, data, output, peft="none", **train) -> SFTConfig:
    settings = {**dict(lr=2e-2, batch_size=8, warmup_ratio=0.0, log_every=1, seed=0, report=False, max_steps=25,
                       micro_batch_tokens=None), **train}
    return SFTConfig(model=ModelConfig(name_or_path=str(model_dir)), output=str(output), peft=peft,
                     data=DataConfig(sources=[DataSource(path=str(data))], eval_fraction=0.1),
                     train=TrainConfig(**settings))


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny ChatML model fine-tuned in full to answer every question with REPLY and end its turn."""
    root = tmp_path_factory.mktemp("chat")
    model_dir = make_tiny_model_dir(root / "base")
    data = write_jsonl(root / "chat.jsonl", chat_rows(40))
    result = run_sft(chat_config(model_dir, data, root / "run"), quiet=True)
    return result, model_dir, data


def test_final_generation_config_stops_at_the_end_of_turn(chat_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, _, _ = chat_run
    tokenizer = AutoTokenizer.from_pretrained(result.final_dir)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, im_end]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say something about item 99."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=30, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert output[-1].item() == im_end  # stopped at the end of its turn, not at max_new_tokens
    assert len(output) < 30
    assert tokenizer.decode(output, skip_special_tokens=True) == REPLY
    # what tunelab's own generation does with the same model
    from tunelab.modeling import load_for_inference
    from tunelab.rollout import generate

    model, tokenizer = load_for_inference(str(result.final_dir))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Say something about item 99."}],
                                         add_generation_prompt=True, tokenize=False)
    assert generate(model, tokenizer, [text], max_new_tokens=30) == [REPLY]


def test_adapter_and_merged_model_carry_the_stop_tokens(chat_run, tmp_path):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from tunelab.modeling import merge_adapter

    _, model_dir, data = chat_run
    lora = run_sft(chat_config(model_dir, data, tmp_path / "lora", peft="lora", max_steps=2), quiet=True)
    assert GenerationConfig.from_pretrained(lora.final_dir).eos_token_id == [2, 4]
    merged = merge_adapter(str(lora.run_dir), str(tmp_path / "merged"))
    assert AutoModelForCausalLM.from_pretrained(merged).generation_config.eos_token_id == [2, 4]


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    """A tiny reward model trained in full on review pairs (the positive review preferred)."""
    from tests.recipes.test_reward import review_pairs, rm_config
    from tunelab.recipes.reward import run_rm

    root = tmp_path_factory.mktemp("rm")
    model_dir = make_tiny_model_dir(root / "base")
    data = write_jsonl(root / "pairs.jsonl", review_pairs(60))
    result = run_rm(rm_config(model_dir, data, root / "run", max_steps=6, log_every=1), quiet=True)
    return result, root


def test_reward_scores_equal_plain_transformers_and_pipeline(rm_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from tunelab.cli import main

    result, _ = rm_run
    rows = [{"prompt": "Write a review of The Silent Harbor.\n", "response": "A superb, moving film."},
            {"prompt": "Write a review of Night Train.\n", "response": "Dull and far too long."},
            {"prompt": "", "response": "Just a text with no prompt."}]
    scored = tmp_path / "scored.jsonl"
    assert main(["score", "--model", str(result.run_dir), "--data", str(write_jsonl(tmp_path / "rows.jsonl", rows)),
                 "--output", str(scored)]) == 0
    tunelab_scores = [json.loads(line)["reward"] for line in scored.read_text().splitlines()]
    assert len(set(round(s, 4) for s in tunelab_scores)) == 3  # a trained head: the rows score differently

    texts = [r["prompt"] + r["response"] for r in rows]
    tokenizer = AutoTokenizer.from_pretrained(result.final_dir)
    model = AutoModelForSequenceClassification.from_pretrained(result.final_dir).eval()
    with torch.no_grad():
        plain = [model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item() for text in texts]
    assert plain == pytest.approx(tunelab_scores, abs=1e-5)

    classify = pipeline("text-classification", model=str(result.final_dir))
    as_is = [out["score"] for out in classify(texts)]  # a regression head: no sigmoid, no extra arguments
    assert as_is == pytest.approx(tunelab_scores, abs=1e-5)
    assert classify(texts[0])[0]["label"] == "reward"
    raw = [out["score"] for out in classify(texts, function_to_apply="none")]
    assert raw == pytest.approx(tunelab_scores, abs=1e-5)


def test_checkpoints_hold_a_loadable_model(chat_run, tmp_path):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from tunelab.cli import main

    _, model_dir, data = chat_run
    result = run_sft(chat_config(model_dir, data, tmp_path / "full", max_steps=4, save_every=2, keep_last=5),
                     quiet=True)
    checkpoint = result.run_dir / "checkpoints" / "step-4"
    saved = AutoModelForCausalLM.from_pretrained(checkpoint / "model").eval()
    final = AutoModelForCausalLM.from_pretrained(result.final_dir).eval()
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        assert torch.equal(saved(ids).logits, final(ids).logits)  # the last checkpoint's model is final/'s
    assert GenerationConfig.from_pretrained(checkpoint / "model").eos_token_id == [2, 4]
    assert (result.run_dir / "checkpoints" / "step-2" / "model" / "model.safetensors").is_file()

    lora = run_sft(chat_config(model_dir, data, tmp_path / "lora", peft="lora", max_steps=2, save_every=1,
                               keep_last=5), quiet=True)
    assert main(["merge", str(lora.run_dir / "checkpoints" / "step-1"), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.num_hidden_layers == final.config.num_hidden_layers


def card_of(folder):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def metrics(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "split" not in r][-1], [r for r in records if r.get("split") == "eval"][-1]


def test_model_card_of_an_sft_lora_run_merge_and_export(chat_run, tmp_path):
    from tunelab.cli import main

    _, model_dir, data = chat_run
    result = run_sft(chat_config(model_dir, data, tmp_path / "lora", peft="lora", max_steps=3, lr=1e-3), quiet=True)
    card = card_of(result.final_dir)
    assert card.data.base_model == str(model_dir)
    assert card.data.library_name == "peft"
    assert {"tunelab", "sft", "lora"} <= set(card.data.tags)
    assert card.data.datasets is None  # a local file names no hub dataset
    text = card.text
    assert "[More Information Needed]" not in text
    assert f"| `{data}` | messages | 40 | 36 | 4 | 1 |" in text  # 40 rows, 36 train, 4 held out
    assert "- **Steps:** 3 optimizer steps" in text
    assert "- `train.lr`: `0.001`" in text and "- `train.max_steps`: `3`" in text
    assert "LoRA (r=8, alpha=16, dropout=0.05, target modules all-linear)" in text
    train, held = metrics(result.run_dir)
    row = next(line for line in text.splitlines() if line.startswith("| loss |"))
    assert row == f"| loss | {train['loss']:.6g} | {held['eval_loss']:.6g} |"
    assert f'AutoPeftModelForCausalLM.from_pretrained("{result.final_dir}")' in text

    assert main(["merge", str(result.run_dir), "--output", str(tmp_path / "merged")]) == 0
    merged = card_of(tmp_path / "merged")
    assert merged.data.library_name == "transformers" and merged.data.base_model == str(model_dir)
    assert "merged into its base weights by `tunelab merge`" in merged.text and row in merged.text
    assert f'AutoModelForCausalLM.from_pretrained("{tmp_path / "merged"}")' in merged.text

    assert main(["export", str(result.run_dir), "--format", "gguf", "--output", str(tmp_path / "m.gguf")]) == 0
    from huggingface_hub import ModelCard

    exported = ModelCard.load(tmp_path / "m.md")
    assert "gguf" in exported.data.tags and 'gguf_file="m.gguf"' in exported.text and row in exported.text


def test_model_card_of_a_full_reward_model_run(rm_run):
    result, _ = rm_run
    card = card_of(result.final_dir)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-classification"
    assert {"tunelab", "rm", "full-fine-tuning"} <= set(card.data.tags)
    assert card.data.base_model.endswith("base")
    source = result.data.sources[0]
    assert (source.rows, source.train, source.held_out) == (60, 48, 12)
    assert f"| {source.rows} | {source.train} | {source.held_out} |" in card.text
    train, held = metrics(result.run_dir)
    row = next(line for line in card.text.splitlines() if line.startswith("| accuracy |"))
    assert row == f"| accuracy | {train['accuracy']:.6g} | {held['eval_accuracy']:.6g} |"
    assert "- **Parameters trained:** full fine-tuning (all weights)" in card.text
    assert 'pipeline("text-classification"' in card.text


def test_hub_named_sources_become_card_datasets():
    from tunelab.card import hub_dataset

    assert hub_dataset("HuggingFaceH4/ultrafeedback_binarized") == "HuggingFaceH4/ultrafeedback_binarized"
    assert hub_dataset("/data/train.jsonl") is None and hub_dataset("./a/b/c.jsonl") is None

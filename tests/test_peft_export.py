"""QLoRA configuration, merging adapters into standalone models, parameter counts in config.yaml."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import instruction_rows, make_tiny_model_dir, sft_config, write_jsonl
from tunelab.cli import main
from tunelab.config import QuantizationConfig, SFTConfig, build_config
from tunelab.modeling import ModelLoadError, bnb_config, merge_adapter
from tunelab.recipes.sft import run_sft


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    model_dir = make_tiny_model_dir(root / "model")
    data = write_jsonl(root / "train.jsonl", instruction_rows(24))
    run_sft(sft_config(model_dir, data, root / "run", max_steps=3, lr=5e-2), quiet=True)
    return model_dir, data, root / "run"


def test_quantization_section_translates_to_bitsandbytes_config():
    config = build_config(SFTConfig, overrides=["peft=qlora", "quantization.compute_dtype=bf16"])
    assert config.quantization_in_force() == QuantizationConfig()
    four = bnb_config(config.quantization)
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.bfloat16
    eight = bnb_config(QuantizationConfig(bits=8))
    assert eight.load_in_8bit and not eight.load_in_4bit
    assert build_config(SFTConfig).quantization_in_force() is None  # only qlora quantizes
    with pytest.raises(Exception, match="'nf4' or 'fp4'"):
        build_config(SFTConfig, overrides=["quantization.type=n4f"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_qlora_without_cuda_fails_before_any_data_work(tmp_path, capsys):
    code = main(["sft", "--model", str(tmp_path / "missing-model"), "--data", str(tmp_path / "missing.jsonl"),
                 "--output", str(tmp_path / "run"), "--peft", "qlora"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--peft qlora needs a CUDA GPU" in err and "missing.jsonl" not in err
    assert not (tmp_path / "run").exists()


def test_merge_gives_the_same_logits_as_the_adapter(trained, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    _, _, run = trained
    out = merge_adapter(str(run), str(tmp_path / "merged"))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    assert not (out / "adapter_config.json").exists()
    ids = torch.tensor([[1, 5, 9, 12, 40, 7]])
    adapter = AutoPeftModelForCausalLM.from_pretrained(run / "final").eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(adapter(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)


def test_merge_refuses_full_models_and_quantized_bases(trained, tmp_path, capsys):
    model_dir, _, run = trained
    with pytest.raises(ModelLoadError, match="not a LoRA adapter"):
        merge_adapter(str(model_dir), str(tmp_path / "x"))
    fake = tmp_path / "adapter"
    fake.mkdir()
    base = tmp_path / "quantized-base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"quantization_config": {"load_in_4bit": True}}))
    (fake / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "peft_type": "LORA"}))
    assert main(["merge", str(fake), "--output", str(tmp_path / "y")]) == 2
    assert "stored quantized" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_config_yaml_records_trainable_parameters(trained):
    _, _, run = trained
    first = (run / "config.yaml").read_text().splitlines()[0]
    assert first.startswith("# lora: training ") and "parameters (" in first and "%)" in first


def test_prompt_tuning_learns_a_task_with_frozen_weights(trained, tmp_path):
    from safetensors.torch import load_file

    model_dir, _, _ = trained
    # a model that answers "Superb." after the marker A and "Dull." after B; the soft prompt alone must
    # learn to make it answer "Dull." to the unmarked prompt
    marked = [{"prompt": ("A" if i % 2 else "B") + ": Write a review: ", "completion": "Superb." if i % 2 else "Dull."}
              for i in range(64)]
    run_sft(sft_config(model_dir, write_jsonl(tmp_path / "marked.jsonl", marked), tmp_path / "marked", peft="none",
                       max_steps=120, lr=1e-2), quiet=True)
    base = tmp_path / "marked" / "final"
    data = write_jsonl(tmp_path / "task.jsonl", [{"prompt": "Write a review: ", "completion": "Dull."}] * 40)
    config = sft_config(base, data, tmp_path / "run", peft="prompt", max_steps=40, lr=0.05, schedule="constant")
    config.prompt_tuning.num_virtual_tokens = 4
    before = load_file(base / "model.safetensors")
    result = run_sft(config, quiet=True)
    assert all(torch.equal(before[k], v) for k, v in load_file(base / "model.safetensors").items())
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "split" not in json.loads(line)]
    assert sum(losses[-5:]) / 5 < 0.2 * losses[0], (losses[0], losses[-5:])
    saved = load_file(result.final_dir / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape[0] == 4
    from tunelab.modeling import load_for_inference
    from tunelab.rollout import generate

    model, tokenizer = load_for_inference(str(result.final_dir))  # the soft prompt is kept, not merged
    assert model.active_peft_config.num_virtual_tokens == 4
    assert generate(model, tokenizer, ["Write a review: "], max_new_tokens=6)[0].startswith("Dull")
    with pytest.raises(ModelLoadError, match="PROMPT_TUNING adapter; only LoRA"):
        merge_adapter(str(result.final_dir), str(tmp_path / "merged"))


def test_prompt_tuning_reference_is_the_model_without_the_prompt(trained, tmp_path):
    from tunelab.config import DataConfig, DataSource, DPOConfig, ModelConfig, TrainConfig
    from tunelab.recipes.dpo import run_dpo

    model_dir, _, _ = trained
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Film {i}: ", "chosen": "Superb.", "rejected": "Dull."}
                                                   for i in range(16)])
    config = DPOConfig(model=ModelConfig(name_or_path=str(model_dir)), output=str(tmp_path / "dpo"), peft="prompt",
                       data=DataConfig(sources=[DataSource(path=str(pairs))], eval_fraction=0.0),
                       train=TrainConfig(max_steps=2, batch_size=8, log_every=1, report=False))
    result = run_dpo(config, quiet=True)
    assert result.reference == "adapter disabled"
    first = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    # a random soft prompt already changes the policy, so unlike LoRA it does not start exactly at log 2
    assert first["loss"] != pytest.approx(0.6931472, abs=1e-6)

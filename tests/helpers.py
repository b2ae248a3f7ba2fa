"""Builders shared by tests: a tiny saved model + tokenizer and small data files, all made on the fly."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from tunelab.config import DataConfig, DataSource, ModelConfig, SFTConfig, TrainConfig
from tunelab.data.templates import alpaca_prompt
from tunelab.demo import world


def final_weights(run_dir: Path) -> dict:
    """The trained tensors of a run's final/: the adapter of a PEFT run, the whole model otherwise."""
    final = Path(run_dir) / "final"
    name = "adapter_model.safetensors" if (final / "adapter_config.json").is_file() else "model.safetensors"
    return load_file(final / name)


def max_weight_diff(a: Path, b: Path) -> float:
    """The largest absolute difference between two runs' final tensors (which must have the same names)."""
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tiny_model_dir(directory: Path, seed: int = 0, hidden_size: int = 32, num_layers: int = 2) -> Path:
    """Save a tokenizer trained on demo reviews and a randomly initialised tiny Llama into `directory`."""
    reviews = world.make_reviews(300, seed)
    texts = [r["text"] for r in reviews] + [alpaca_prompt(world.review_instruction(r["title"])) for r in reviews]
    tokenizer = world.build_tokenizer(texts, vocab_size=512)
    model = world.build_tiny_model(tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=4,
                                   intermediate_size=64, seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def instruction_rows(n: int, seed: int = 0) -> list[dict]:
    return [{"instruction": world.review_instruction(r["title"]), "output": r["text"]}
            for r in world.make_reviews(n, seed)]


def sft_config(model_dir: Path, data: Path, output: Path, peft: str = "lora", **train) -> SFTConfig:
    """A small, fast SFT config; `train` overrides TrainConfig fields."""
    defaults = dict(lr=1e-2, batch_size=8, warmup_ratio=0.0, log_every=1, seed=0, report=False)
    return SFTConfig(model=ModelConfig(name_or_path=str(model_dir)), output=str(output), peft=peft,
                     data=DataConfig(sources=[DataSource(path=str(data))], max_length=192, eval_fraction=0.1),
                     train=TrainConfig(**{**defaults, **train}))

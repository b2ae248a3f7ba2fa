"""Tiny random encoder-decoders (T5, BART) with a tokenizer made on the fly, and a copy task for them."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from tunelab.demo import world

WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]


def copy_rows(n: int, seed: int = 0, length: int = 3) -> list[dict]:
    """prompt/completion rows whose completion repeats the prompt's words (a task a tiny model learns fast)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(length))
        rows.append({"prompt": f"copy: {words}", "completion": f" {words}"})
    return rows


def make_tokenizer(kind: str = "t5"):
    """A byte-level BPE tokenizer that ends every encoded text with `</s>` as T5's does (BART's: `<s> ... </s>`),
    which the families' sequence-classification heads read their score at."""
    from tokenizers import processors

    texts = [f"copy: {r['prompt']} {r['completion']}" for r in copy_rows(200)] + WORDS * 5
    tokenizer = world.build_tokenizer(texts, vocab_size=320)
    start = "<s> " if kind == "bart" else ""
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{start}$A </s>", pair=f"{start}$A </s> $B:1 </s>:1",
        special_tokens=[("<s>", tokenizer.bos_token_id), ("</s>", tokenizer.eos_token_id)])
    return tokenizer


def make_tiny_seq2seq_dir(directory: Path, kind: str = "t5", seed: int = 0) -> Path:
    """Save a random tiny T5 (or BART) and its tokenizer: pad is the T5 decoder's start token, EOS `</s>`."""
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    tokenizer = make_tokenizer(kind)
    torch.manual_seed(seed)
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               vocab_size=len(tokenizer))
    if kind == "t5":
        config = T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                          decoder_start_token_id=tokenizer.pad_token_id, dropout_rate=0.0, **ids)
        model = T5ForConditionalGeneration(config)
    else:
        config = BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                            max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                            decoder_start_token_id=tokenizer.eos_token_id, forced_eos_token_id=None,
                            dropout=0.0, attention_dropout=0.0, **ids)
        model = BartForConditionalGeneration(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Pairs on the copy task: the chosen response copies the prompt's words, the rejected one does not."""
    rng = random.Random(seed)
    rows = []
    for row in copy_rows(n, seed):
        words = row["completion"].split()
        wrong = [rng.choice([w for w in WORDS if w != word]) for word in words]
        rows.append({"prompt": row["prompt"], "chosen": row["completion"], "rejected": " " + " ".join(wrong)})
    return rows


def cat_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Pays for the word 'cat': its share of a response's words (x10)."""
    return [10 * r.split().count("cat") / max(1, len(r.split())) for r in responses]

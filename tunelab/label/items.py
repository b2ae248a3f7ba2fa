"""What is labeled: items (one prompt each) and the pair of responses shown for an item.

An item's key is derived from its prompt text (a hash, plus a counter for a prompt that occurs more than once),
so a restarted server recognises the items already labeled in the file even if the prompts were reordered.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.data.load import DataError, load_rows
from tunelab.label import LabelError


@dataclass(frozen=True)
class Response:
    """One response and its hidden source (a model, or a column of the candidates file)."""

    text: str
    source: str


@dataclass(frozen=True)
class Pair:
    """The two responses of an item, in a fixed order (the page shows them in a random order)."""

    first: Response
    second: Response


@dataclass
class Item:
    """One prompt to label. `inputs` holds the text each model continues from (models may render chat rows
    with their own templates); `prompt` is what the page shows and the labels file stores."""

    key: str
    index: int
    prompt: str
    inputs: list[str] = field(default_factory=list)


def item_keys(prompts: list[str]) -> list[str]:
    """Stable keys: a hash of the prompt, `-2`, `-3`, ... for its later repeats."""
    seen: dict[str, int] = {}
    keys = []
    for prompt in prompts:
        digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]
        seen[digest] = seen.get(digest, 0) + 1
        keys.append(digest if seen[digest] == 1 else f"{digest}-{seen[digest]}")
    return keys


def _response_list(row, key: str, minimum: int) -> list[str]:
    value = row.values.get(key)
    if not isinstance(value, list) or len(value) < minimum or not all(isinstance(v, str) for v in value):
        raise LabelError(f"{row.where}: field '{key}' must be a list of at least {minimum} strings"
                         f"{'' if key != 'responses' else ' (the responses to compare)'}, got {value!r:.80}")
    return value


def load_candidates(path: str, seed: int = 0, only: list[str] | None = None) -> tuple[list[Item], dict[str, Pair]]:
    """Items and their pairs from a file of rows `{prompt, responses: [...], sources: [...] (optional)}`.

    With more than two responses, two are drawn per item (fixed by `seed` and the prompt, so every labeler
    of an item sees the same two). Sources default to `FILE[i]`, the response's position in the row. `only`
    (prompts, e.g. from `--prompts`) keeps those prompts, in their order; each must have a row.
    """
    try:
        rows = load_rows(path)
    except DataError as exc:
        raise LabelError(str(exc)) from None
    name = Path(path).name
    prompts, choices = [], []
    for row in rows:
        prompt = row.values.get("prompt")
        if not isinstance(prompt, str):
            raise LabelError(f"{row.where}: field 'prompt' must be a string, got {type(prompt).__name__}")
        responses = _response_list(row, "responses", 2)
        sources = [f"{name}[{i}]" for i in range(len(responses))]
        if row.values.get("sources") is not None:
            sources = _response_list(row, "sources", len(responses))[:len(responses)]
            if len(set(sources)) != len(sources):
                raise LabelError(f"{row.where}: field 'sources' names a source twice: {sources}")
        prompts.append(prompt)
        choices.append([Response(text, source) for text, source in zip(responses, sources)])
    keys = item_keys(prompts)
    by_prompt = {}
    for prompt, key, options in zip(prompts, keys, choices):
        by_prompt.setdefault(prompt, (key, options))
    if only is not None:
        missing = [p for p in only if p not in by_prompt]
        if missing:
            raise LabelError(f"{len(missing)} of the {len(only)} prompts have no row in {path} "
                             f"(first: {missing[0]!r:.80})")
        selected = [(p, *by_prompt[p]) for p in dict.fromkeys(only)]
    else:
        selected = list(zip(prompts, keys, choices))
    items, pairs = [], {}
    for index, (prompt, key, options) in enumerate(selected):
        first, second = (random.Random(f"{seed}-{key}").sample(options, 2) if len(options) > 2 else options)
        items.append(Item(key, index, prompt))
        pairs[key] = Pair(first, second)
    return items, pairs


def load_prompt_items(path: str, tokenizers: list) -> list[Item]:
    """Items from a prompts file, read as `tunelab generate` reads it; each model's input rendered with its
    own tokenizer (chat rows through its chat template). A tokenizer of None reads plain prompts only."""
    from tunelab.generation import prompt_rows

    per_model = []
    for tokenizer in tokenizers or [None]:
        try:
            per_model.append([row.prompt for row in prompt_rows(path, tokenizer)])
        except DataError as exc:
            raise LabelError(str(exc)) from None
        except (AttributeError, TypeError):  # chat rows need a tokenizer's template
            raise LabelError(f"{path}: chat prompts need a model's chat template; with --candidates, use "
                             "plain-text prompts (or leave --prompts out)") from None
    shown = per_model[0]
    return [Item(key, i, prompt, [inputs[i] for inputs in per_model])
            for i, (key, prompt) in enumerate(zip(item_keys(shown), shown))]

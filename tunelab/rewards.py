"""Reward sources. Here: a sequence-classification reward model, its pooling, and a batched scorer.

A decoder reward model (a causal LM with a one-output `score` head) reads its score at the last
attended token, found from the attention mask, with positions counted over real tokens, so left and
right padding give the same score, and a pad token equal to EOS is never confused with the sequence end. Encoders (BERT, MiniLM) use their
own classification head on [CLS].
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from tunelab.data.preference import scored_sequence
from tunelab.data.batching import pad_batch
from tunelab.logprobs import hidden_states


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended position of each row: `[B, T]` -> `[B]` (works for left or right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(dim=1)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar score per sequence: `[B, T]` -> `[B]` (fp32)."""
    base = _unwrap(model)
    head = getattr(base, "score", None)
    if head is None:  # encoders: the model's own pooler + classifier
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
    # positions count real tokens only, so a left-padded row scores exactly like the unpadded one
    hidden = hidden_states(model, input_ids, attention_mask)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
    return head(last)[:, 0].float()


class RewardModule(nn.Module):
    """Wraps a sequence-classification model so that forward returns `sequence_scores` (one DDP forward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    # FSDP's transformer auto-wrap reads the block classes to shard from the model it is given
    _no_split_modules = property(lambda self: getattr(self.model, "_no_split_modules", None))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                chosen_end: torch.Tensor | None = None, rejected_end: torch.Tensor | None = None) -> torch.Tensor:
        """Scores `[B]` of padded rows, or with `segments`, of packed pairs (`tunelab.shared_prefix.pack_pairs`):
        `[2N]`, the chosen sides then the rejected ones."""
        if segments is None:
            return sequence_scores(self.model, input_ids, attention_mask)
        return packed_pair_scores(self.model, input_ids, position_ids, segments, chosen_end, rejected_end)


def packed_pair_scores(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                       segments: torch.Tensor, chosen_end: torch.Tensor, rejected_end: torch.Tensor) -> torch.Tensor:
    """A decoder reward model's scores of packed pairs: each side's score read at its last token, `[2N]`."""
    from tunelab.shared_prefix import packed_hidden_states

    hidden = packed_hidden_states(model, input_ids, position_ids, segments)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = torch.cat([hidden[rows, chosen_end], hidden[rows, rejected_end]])
    return _unwrap(model).score(last)[:, 0].float()


class RewardScorer:
    """Score prompt + response pairs with a trained reward model (a `tunelab rm` run or its final/).

    >>> scorer = RewardScorer("runs/rm")
    >>> scorer.score(["Write a review of X."], ["A superb film."])
    [1.73]
    """

    def __init__(self, path: str | Path, batch_size: int = 16, device: torch.device | str | None = None,
                 chat_template: str | None = None):
        from tunelab.modeling import load_reward_model_for_inference

        path = Path(path)
        if (path / "final").is_dir():
            path = path / "final"
        elif (path / "model").is_dir():  # a checkpoint: the model saved in it
            path = path / "model"
        self.model, self.tokenizer = load_reward_model_for_inference(str(path))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.batch_size = batch_size
        self.chat_template = chat_template

    @torch.no_grad()
    def score(self, prompts: list, responses: list) -> list[float]:
        """Rewards of each (prompt, response); prompts and responses are strings or message lists."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses: they must pair up")
        sequences = [scored_sequence(p, r, self.tokenizer, self.chat_template) for p, r in zip(prompts, responses)]
        limit = getattr(self.model.config, "max_position_embeddings", None)
        scores: list[float] = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = [s[:limit] if limit else s for s in sequences[start:start + self.batch_size]]
            batch = pad_batch(chunk, [[0] * len(s) for s in chunk], self.tokenizer.pad_token_id)
            values = sequence_scores(self.model, batch["input_ids"].to(self.device),
                                     batch["attention_mask"].to(self.device))
            scores.extend(values.tolist())
        return scores


RewardFn = Callable[[list[str], list[str]], list[float]]


class RewardSourceError(ValueError):
    """A reward source could not be found or used; the message says which and what was expected."""


def _pipeline_reward(model: str, label: str | None, batch_size: int, device=None) -> RewardFn:
    from transformers import pipeline

    from tunelab.modeling import load_classifier

    network, tokenizer = load_classifier(model)
    classifier = pipeline("text-classification", model=network, tokenizer=tokenizer, top_k=None, device=device)

    def score(prompts: list[str], responses: list[str]) -> list[float]:
        # as in the classic sentiment lab, the classifier reads the whole text, prompt + response
        outputs = classifier([p + r for p, r in zip(prompts, responses)], batch_size=batch_size, truncation=True)
        chosen = label or outputs[0][0]["label"]
        scores = []
        for result in outputs:
            by_label = {item["label"]: item["score"] for item in result}
            if chosen not in by_label:
                raise RewardSourceError(f"reward pipeline {model} has no label '{chosen}'; it has {sorted(by_label)}")
            scores.append(by_label[chosen])
        return scores
    return score


def checked_rewards(values, count: int, source: str) -> list[float]:
    """A reward source's output as `count` finite floats, or a RewardSourceError saying what it returned, and
    for which response of the batch."""
    expected = f"it must return a list of {count} numbers, one per response"
    if values is None or isinstance(values, (str, bytes, dict)):
        raise RewardSourceError(f"reward {source} returned {_shown(values)} for a batch of {count} responses; "
                                f"{expected}")
    if isinstance(values, torch.Tensor):
        values = values.detach().float().flatten().tolist()
    try:
        values = list(values)
    except TypeError:
        raise RewardSourceError(f"reward {source} returned {_shown(values)}; {expected}") from None
    if len(values) != count:
        raise RewardSourceError(f"reward {source} returned {len(values)} scores for {count} responses; {expected}")
    scores = []
    for i, value in enumerate(values):
        number = _as_number(value)
        if number is None or not math.isfinite(number):
            raise RewardSourceError(f"reward {source} returned {_shown(value)} for response {i} of the batch of "
                                    f"{count}; {expected}, each finite")
        scores.append(number)
    return scores


def _as_number(value) -> float | None:
    """A plain or numpy/torch scalar as a float; None for anything else (strings and booleans included)."""
    if isinstance(value, (str, bytes, bool)) or value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    try:
        return float(value) if hasattr(value, "__float__") else None
    except (TypeError, ValueError):
        return None


def _shown(value) -> str:
    text = repr(value)
    return f"{text[:60] + '...' if len(text) > 60 else text} ({type(value).__name__})"


def _callable_reward(spec: str) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise RewardSourceError(f"reward callable '{spec}' could not be imported ({exc}); expected module:function") from None
    if not callable(fn):
        raise RewardSourceError(f"reward '{spec}' is not callable")

    def score(prompts: list[str], responses: list[str]) -> list[float]:
        try:
            values = fn(prompts, responses)
        except Exception as exc:
            raise RewardSourceError(f"reward {spec} failed on a batch of {len(responses)} responses: "
                                    f"{type(exc).__name__}: {exc}") from exc
        return checked_rewards(values, len(responses), spec)
    return score


def load_reward_fn(source: str, label: str | None = None, batch_size: int = 16,
                   device: torch.device | str | None = None) -> RewardFn:
    """A function (prompts, responses) -> scores from a reward source.

    `source` is a `tunelab rm` run or model directory; `pipeline:MODEL` for a Hugging Face
    text-classification pipeline, scoring prompt + response and picking `label`'s score (default: the
    first label); or `module:function`, a Python callable taking lists of prompts and responses.
    A reward model or pipeline runs on `device` (with several processes: each process's own).
    A config never executes code: the callable is named, and must be importable.
    """
    if not source:
        raise RewardSourceError("no reward given: pass --reward (a tunelab rm run, pipeline:MODEL, or module:function)")
    if source.startswith("pipeline:"):
        return _pipeline_reward(source[len("pipeline:"):], label, batch_size, device)
    if Path(source).exists():
        return RewardScorer(source, batch_size=batch_size, device=device).score
    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", source):
        return _callable_reward(source)
    raise RewardSourceError(f"reward source '{source}' is not an existing reward-model directory, pipeline:MODEL, "
                     "or module:function")

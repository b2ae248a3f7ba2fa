"""Preference pairs for reward modeling: (prompt, chosen, rejected, margin) -> two token sequences to score.

A pair is scored as whole sequences, prompt + response: for an encoder (a tokenizer with [CLS] and
[SEP]) as a text pair, for a causal LM as `bos + prompt + response + eos`, and for chat messages
through the chat template. Pairs whose chosen and rejected are identical or empty teach nothing and
are dropped and counted, as are human labels with no preference (`choice` tie or skip, from `tunelab label`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.config import DataConfig
from tunelab.data.cache import Codec, TokenCache
from tunelab.data.dataset import TokenizedData, prepare_data
from tunelab.data.formats import Example, Messages
from tunelab.data.messages import as_messages, has_reply
from tunelab.data.templates import Rendered, render_chat, require_chat_template, tokenize, fit_length, render_example


@dataclass
class ScoredPair:
    """Token ids of the chosen and rejected sequences `[T_c]`, `[T_r]` and the pair's margin."""

    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0
    where: str = ""


def uses_text_pairs(tokenizer) -> bool:
    """Encoders (BERT, MiniLM) take prompt and response as a [CLS] a [SEP] b [SEP] pair."""
    return tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None


def scored_sequence(prompt: str | Messages | None, response: str | Messages, tokenizer,
                    chat_template: str | None = None, where: str = "", tools: list[dict] | None = None) -> list[int]:
    """Token ids of prompt + response as a reward model reads them, with nothing tunelab adds itself.

    The convention is plain transformers': text rows are `prompt + response` tokenized as one text with the
    tokenizer's own special tokens (what `pipeline("text-classification")` and a tokenizer call give), an
    encoder's the pair `(prompt, response)`, chat rows the conversation rendered by the chat template and
    tokenized as it is (what `apply_chat_template(..., tokenize=True)` gives). The score is read at the last
    token, so a saved reward model scores a row in plain transformers as it does in tunelab.
    """
    if isinstance(prompt, list) or isinstance(response, list):
        conversation = as_messages(prompt, "user") + as_messages(response, "assistant")
        template = require_chat_template(tokenizer, chat_template, where)
        return tokenize(tokenizer, render_chat(tokenizer, template, conversation, False, tools, where))
    if uses_text_pairs(tokenizer):
        encoded = tokenizer(prompt, response) if prompt else tokenizer(response)
        return list(encoded["input_ids"])
    return tokenize(tokenizer, (prompt or "") + response, special=True)


def no_preference(example: Example) -> str | None:
    """`dropped_tie` / `dropped_skip` for a human label with no preference (`choice` tie or skip, as
    `tunelab label` writes them: chosen and rejected are then just the two responses), else None."""
    choice = example.extra.get("choice")
    return {"tie": "dropped_tie", "skip": "dropped_skip"}.get(choice.lower()) if isinstance(choice, str) else None


def _is_empty(value: str | Messages) -> bool:
    if isinstance(value, list):
        return not has_reply(value)
    return not value.strip()


def to_pair(example: Example, tokenizer, config: DataConfig) -> tuple[ScoredPair | None, str]:
    """Render one preference example; returns (pair or None, kept/truncated/dropped_* status)."""
    if no_preference(example):
        return None, no_preference(example)
    if _is_empty(example.chosen) or _is_empty(example.rejected):
        return None, "dropped_empty"
    if example.chosen == example.rejected:
        return None, "dropped_identical"
    chosen, rejected = (scored_sequence(example.prompt, response, tokenizer, config.chat_template, example.where,
                                        example.tools) for response in (example.chosen, example.rejected))
    status = "kept"
    if max(len(chosen), len(rejected)) > config.max_length:
        if config.overlong == "drop":
            return None, "dropped_long"
        chosen, rejected, status = chosen[:config.max_length], rejected[:config.max_length], "truncated"
        if chosen == rejected:  # the difference lay past max_length
            return None, "dropped_long"
    return ScoredPair(chosen, rejected, example.margin, example.where), status


SCORED_PAIRS = Codec(  # the chosen and rejected ids (nothing masked), the margin
    encode=lambda pair: ([(pair.chosen, [0] * len(pair.chosen)), (pair.rejected, [0] * len(pair.rejected))],
                         [pair.margin]),
    decode=lambda seqs, numbers, where: ScoredPair(seqs[0][0], seqs[1][0], numbers[0], where))


def prepare_preference_data(config: DataConfig, tokenizer, seed: int = 0) -> TokenizedData[ScoredPair]:
    """Rendered preference pairs of every source, split into train and held out (kept between runs in the
    tokenized cache, data.cache_dir)."""
    return prepare_data(config, lambda example: to_pair(example, tokenizer, config), ("preference",),
                        "reward modeling", seed, cache=TokenCache.for_config(config, tokenizer, "rm", SCORED_PAIRS))


@dataclass
class PolicyPair:
    """A preference pair rendered for DPO: prompt + chosen and prompt + rejected, masks on the completions.

    `ref_chosen` / `ref_rejected` hold precomputed reference log-probs when the recipe computes them once.
    """

    chosen: Rendered
    rejected: Rendered
    where: str = ""
    ref_chosen: float | None = None
    ref_rejected: float | None = None


def to_policy_pair(example: Example, tokenizer, config: DataConfig) -> tuple[PolicyPair | None, str]:
    """Render a preference example for DPO; returns (pair or None, kept/truncated/dropped_* status)."""
    if no_preference(example):
        return None, no_preference(example)
    # the rows' prompt is already the turns both sides share (tunelab.data.formats.shared_prompt)
    prompt, chosen, rejected = example.prompt or "", example.chosen, example.rejected
    if _is_empty(chosen) or _is_empty(rejected):
        return None, "dropped_empty"
    if chosen == rejected:
        return None, "dropped_identical"
    rendered, statuses = [], []
    for completion in (chosen, rejected):
        row = Example("prompt_completion", example.where, prompt=prompt, completion=completion, tools=example.tools)
        fitted, status = fit_length(render_example(row, tokenizer, chat_template=config.chat_template),
                                    config.max_length, config.overlong)
        if fitted is None:
            return None, status
        rendered.append(fitted)
        statuses.append(status)
    return PolicyPair(rendered[0], rendered[1], example.where), "truncated" if "truncated" in statuses else "kept"


POLICY_PAIRS = Codec(  # prompt + chosen and prompt + rejected, each with its completion mask
    encode=lambda pair: ([(pair.chosen.ids, pair.chosen.mask), (pair.rejected.ids, pair.rejected.mask)], []),
    decode=lambda seqs, numbers, where: PolicyPair(Rendered(*seqs[0], where), Rendered(*seqs[1], where), where))


def prepare_policy_pairs(config: DataConfig, tokenizer, seed: int = 0) -> TokenizedData[PolicyPair]:
    """DPO pairs of every source, split into train and held out (kept between runs in the tokenized cache)."""
    return prepare_data(config, lambda example: to_policy_pair(example, tokenizer, config), ("preference",),
                        "preference optimization", seed,
                        cache=TokenCache.for_config(config, tokenizer, "dpo", POLICY_PAIRS))

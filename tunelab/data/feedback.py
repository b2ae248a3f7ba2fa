"""Unpaired binary feedback for KTO: (prompt, completion, label) rows, or preference pairs split in two.

LLaMA-Factory's KTO rows (a `conversations` / `messages` conversation with a `kto_tag`, format `kto`) are
read as such rows: the last assistant turn is the completion, the turns before it the prompt.

A `prompt_completion` row with a boolean `label` is one desirable (true) or undesirable (false) completion;
the prompt may be text or chat messages, rendered as for SFT (mask on the completion and its end token).
A preference pair (`prompt`, `chosen`, `rejected`) gives one desirable and one undesirable row. For
training every row stands alone (the two halves of a pair are shuffled apart, as KTO's unpaired setting
has them); held-out pairs stay together, so the evaluation can also tell whether the chosen side's
implicit reward beats the rejected side's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tunelab.config import DataConfig
from tunelab.data.batching import pad_batch
from tunelab.data.cache import Codec, TokenCache
from tunelab.data.dataset import TokenizedData, prepare_data
from tunelab.data.formats import Example
from tunelab.data.load import DataError
from tunelab.data.preference import to_policy_pair
from tunelab.data.templates import Rendered, fit_length, has_content, render_example


@dataclass
class FeedbackRow:
    """One completion with its verdict: ids of prompt + completion, the mask on the completion."""

    rendered: Rendered
    desirable: bool

    @property
    def completion_start(self) -> int:
        """Index of the first trained token: what comes before it is the prompt."""
        return next((i for i, m in enumerate(self.rendered.mask) if m), len(self.rendered.mask))


@dataclass
class FeedbackItem:
    """One row, or a held-out preference pair as its (desirable, undesirable) rows.

    `partners`, once set for a training batch (`with_kl_partners`), hold the row whose completion each row's
    prompt is paired with for KTO's KL estimate.
    """

    rows: list[FeedbackRow]
    where: str = ""
    partners: list[FeedbackRow] | None = None


def parse_label(example: Example) -> bool:
    """The `label` (or a KTO row's `kto_tag`) of a row as a bool; true/false strings (as CSV files hold them)
    are read too."""
    name = example.extra.get("label_field", "label")
    if example.extra.get("label") is None:
        raise DataError(f"{example.where}: missing field '{name}' (true: a desirable completion, false: an "
                        "undesirable one)")
    value = example.extra["label"]
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise DataError(f"{example.where}: field '{name}' must be a boolean (true: desirable, false: undesirable), "
                    f"got {type(value).__name__} ({value!r:.60})")


def to_feedback_item(example: Example, tokenizer, config: DataConfig) -> tuple[FeedbackItem | None, str]:
    """Render one feedback row or preference pair; returns (item or None, kept/truncated/dropped_* status)."""
    if example.format == "preference":
        pair, status = to_policy_pair(example, tokenizer, config)
        if pair is None:
            return None, status
        return FeedbackItem([FeedbackRow(pair.chosen, True), FeedbackRow(pair.rejected, False)], example.where), status
    desirable = parse_label(example)
    if not has_content(example):
        return None, "dropped_empty"
    rendered, status = fit_length(render_example(example, tokenizer, chat_template=config.chat_template),
                                  config.max_length, config.overlong)
    if rendered is None:
        return None, status
    return FeedbackItem([FeedbackRow(rendered, desirable)], example.where), status


FEEDBACK_ITEMS = Codec(  # each row's ids and completion mask, and its verdict (1.0 desirable, 0.0 not)
    encode=lambda item: ([(row.rendered.ids, row.rendered.mask) for row in item.rows],
                         [float(row.desirable) for row in item.rows]),
    decode=lambda seqs, numbers, where: FeedbackItem(
        [FeedbackRow(Rendered(ids, mask, where), good == 1.0) for (ids, mask), good in zip(seqs, numbers)], where))


def prepare_feedback_data(config: DataConfig, tokenizer, seed: int = 0) -> TokenizedData[FeedbackItem]:
    """Feedback rows of every source, split into train (one row per item) and held out (pairs kept whole).

    The split is made on the source's rows, so both halves of a pair land on the same side. The summary
    counts train and held-out rows (two per pair). Rendered rows are kept between runs in the tokenized cache.
    """
    data = prepare_data(config, lambda example: to_feedback_item(example, tokenizer, config),
                        ("prompt_completion", "preference"), "KTO", seed,
                        cache=TokenCache.for_config(config, tokenizer, "kto", FEEDBACK_ITEMS))
    train, start = [], 0
    for summary in data.sources:
        items = data.train[start:start + summary.train]
        start += summary.train
        train.extend(FeedbackItem([row], item.where) for item in items for row in item.rows)
        summary.train = sum(len(item.rows) for item in items)
        if summary.format == "preference":
            summary.format = "preference pairs, 2 rows each"
    for summary, count in zip(data.sources, _held_out_rows(data)):
        summary.held_out = count
    data.train = train
    return data


def _held_out_rows(data: TokenizedData[FeedbackItem]) -> list[int]:
    counts, start = [], 0
    for summary in data.sources:
        counts.append(sum(len(item.rows) for item in data.held_out[start:start + summary.held_out]))
        start += summary.held_out
    return counts


def item_length(item: FeedbackItem) -> int:
    return sum(len(row.rendered.ids) for row in item.rows)


def _flat_rows(items: list[FeedbackItem]) -> list[tuple[FeedbackRow, FeedbackRow | None]]:
    """(row, KL partner or None) of a batch: the first rows of the items, then the undesirable halves of pairs."""
    def partner(item: FeedbackItem, k: int) -> FeedbackRow | None:
        return item.partners[k] if item.partners else None
    return ([(item.rows[0], partner(item, 0)) for item in items]
            + [(item.rows[1], partner(item, 1)) for item in items if len(item.rows) == 2])


def with_kl_partners(items: list[FeedbackItem]) -> list[FeedbackItem]:
    """A training batch's items with each row's KL partner set: the next row of the whole batch (the last row
    takes the first's), so that splitting the batch into micro-batches leaves the pairing as it is."""
    rows = [row for row, _ in _flat_rows(items)]
    following = [rows[(j + 1) % len(rows)] for j in range(len(rows))]
    firsts, seconds = iter(following[:len(items)]), iter(following[len(items):])
    return [replace(item, partners=[next(firsts)] + ([next(seconds)] if len(item.rows) == 2 else []))
            for item in items]


def collate_feedback(items: list[FeedbackItem], pad_id: int, max_length: int) -> dict:
    """Rows `[R, T]` (first rows of the items, then the undesirable halves of pairs) with completion masks,
    `desirable [R]`, `pairs [P, 2]` (row indices of each pair's desirable and undesirable side), and the
    mismatched rows of KTO's KL estimate as `kl_input_ids`, `kl_attention_mask`, `kl_loss_mask`: each row's
    prompt with its partner's completion (set by `with_kl_partners`, else the next row of these items; the
    last takes the first's), cut at `max_length`. A row whose partner is itself (a batch of one row) gives
    no mismatched pair: `kl_valid [R]` is False there.
    """
    flat = _flat_rows(items)
    rows = [row for row, _ in flat]
    partners = [partner if partner is not None else rows[(j + 1) % len(rows)] for j, (_, partner) in enumerate(flat)]
    paired = [i for i, item in enumerate(items) if len(item.rows) == 2]
    batch = pad_batch([r.rendered.ids for r in rows], [r.rendered.mask for r in rows], pad_id)
    batch["n_items"] = len(rows)
    batch["n_tokens"] = int(batch["attention_mask"].sum())
    batch["desirable"] = torch.tensor([r.desirable for r in rows], dtype=torch.bool)
    batch["pairs"] = torch.tensor([[i, len(items) + j] for j, i in enumerate(paired)], dtype=torch.long).view(-1, 2)
    kl_ids, kl_masks = [], []
    for row, other in zip(rows, partners):
        start, other_start = row.completion_start, other.completion_start
        ids = (row.rendered.ids[:start] + other.rendered.ids[other_start:])[:max_length]
        kl_ids.append(ids)
        kl_masks.append(([0] * start + other.rendered.mask[other_start:])[:max_length])
    kl = pad_batch(kl_ids, kl_masks, pad_id)
    batch.update({f"kl_{key}": value for key, value in kl.items()})
    batch["kl_valid"] = torch.tensor([other is not row for row, other in zip(rows, partners)], dtype=torch.bool)
    return batch

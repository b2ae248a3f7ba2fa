"""From data sources to tokenized train and held-out sets, with a per-source summary.

load rows -> detect format + validate -> render (ids + loss mask) -> length policy -> split.
Rows that are valid but unusable are dropped and counted, never silently.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Generic, TypeVar

from tunelab.config import DataConfig, DataSource
from tunelab.data.formats import Example, SourceReading, read_source
from tunelab.data.load import DataError, load_rows

if TYPE_CHECKING:
    from tunelab.data.cache import TokenCache
from tunelab.data.templates import Rendered, fit_length, has_content, render_examples

Item = TypeVar("Item")
RENDER_CHUNK = 512  # rows rendered together: one batched tokenizer call each


@dataclass
class SourceSummary:
    """What happened to the rows of one source."""

    path: str
    format: str
    weight: float
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_long: int = 0
    dropped_empty: int = 0
    dropped_identical: int = 0
    dropped_tie: int = 0  # human labels with no preference (tunelab label's ties and skips)
    dropped_skip: int = 0
    train: int = 0
    held_out: int = 0
    role: str = "train"  # or "eval": a held-out source (data.eval_sources)
    cached: bool = False  # its rendered rows came from the tokenized cache (tunelab.data.cache)
    reading: str = ""  # how its rows were read: format, columns read and mapped, known columns not read
    warnings: list[str] = field(default_factory=list)

    @property
    def per_epoch(self) -> int:
        return round(self.weight * self.train)

    def drops(self) -> str:
        text = f"{self.dropped_long} dropped as too long, {self.dropped_empty} dropped as empty"
        if self.dropped_identical:
            text += f", {self.dropped_identical} dropped with chosen == rejected"
        if self.dropped_tie or self.dropped_skip:
            text += f", {self.dropped_tie} ties and {self.dropped_skip} skips dropped (labels with no preference)"
        return text

    def line(self) -> str:
        head = f"{self.path} [{self.format}]: {self.rows} rows, {self.kept} kept ({self.truncated} truncated), "
        if self.role == "eval":
            text = head + f"{self.drops()}; {self.held_out} held out (eval data)"
        else:
            text = head + (f"{self.drops()}; {self.train} train / {self.held_out} held out; weight {self.weight:g} "
                           f"-> {self.per_epoch} rows per epoch")
        return text + ("; tokenized rows from the cache" if self.cached else "")


@dataclass
class TokenizedData(Generic[Item]):
    """Train and held-out items of every source, in source order, with their summaries."""

    train: list[Item] = field(default_factory=list)
    held_out: list[Item] = field(default_factory=list)
    sources: list[SourceSummary] = field(default_factory=list)

    @property
    def source_sizes(self) -> list[int]:
        return [s.train for s in self.sources]

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self.sources]

    def summary_lines(self) -> list[str]:
        """One line per source, then a `warning:` line for each thing a source's reading left out."""
        return [s.line() for s in self.sources] + [f"warning: {w}" for s in self.sources for w in s.warnings]


def split_held_out(n: int, fraction: float, cap: int, seed: int, key: str) -> set[int]:
    """Indices of the rows held out for evaluation (deterministic for a seed and source)."""
    count = min(cap, round(n * fraction))
    if count == 0 or count >= n:
        return set()
    return set(random.Random(f"{seed}-heldout-{key}").sample(range(n), count))


def read_examples(source: DataSource, config: DataConfig, formats: tuple[str, ...], purpose: str) -> SourceReading:
    """Load and validate one source (its column mapping over data.columns; detection preferring `formats`);
    a source of a kind `purpose` cannot use is a DataError."""
    reading = read_source(load_rows(source.path, source.split), source.format, source.path,
                          columns={**config.columns, **source.columns}, prefer=formats)
    if reading.kind not in formats:
        raise DataError(f"{source.path}: rows are '{reading.format}' data, which {purpose} cannot use; expected "
                        f"{' or '.join(formats)} rows")
    return reading


Render = Callable[[list[Example]], list[tuple[Item | None, str]]]


def one_by_one(render: Callable[[Example], tuple[Item | None, str]]) -> Render:
    return lambda examples: [render(example) for example in examples]


def render_source(source: DataSource, config: DataConfig, render: Render, formats: tuple[str, ...],
                  purpose: str, cache: TokenCache | None = None) -> tuple[SourceSummary, list[Item]]:
    """One source's usable items and its summary (drops counted, how it was read noted); `render` takes a
    chunk of examples at once. With `cache`, a source rendered before with the same key is read from it."""
    key = cache.key(source) if cache is not None else None
    if key is not None:
        hit = cache.get(key, source)
        if hit is not None:
            return hit
    reading = read_examples(source, config, formats, purpose)
    summary = SourceSummary(source.path, reading.format, source.weight, rows=len(reading.examples),
                            reading=reading.describe())
    warning = reading.warning(source.path)
    summary.warnings += [warning] if warning else []
    kept: list[Item] = []
    results = [result for start in range(0, len(reading.examples), RENDER_CHUNK)
               for result in render(reading.examples[start:start + RENDER_CHUNK])]
    for item, status in results:
        if item is None:
            setattr(summary, status, getattr(summary, status) + 1)
            continue
        summary.truncated += status == "truncated"
        kept.append(item)
    if key is not None:
        problem = cache.put(key, summary, kept)
        summary.warnings += [problem] if problem else []
    return summary, kept


def prepare_data(config: DataConfig, render: Callable[[Example], tuple[Item | None, str]] | None,
                 formats: tuple[str, ...], purpose: str, seed: int = 0, render_batch: Render | None = None,
                 cache: TokenCache | None = None) -> TokenizedData[Item]:
    """Load, validate, render and split every source; data.eval_sources, when given, are the held-out rows.

    `render` turns an example into an item and a status (kept, truncated, or dropped_long /
    dropped_empty / dropped_identical with None); `render_batch`, given instead, does so for a list of them.
    `cache` (rendered `Rendered` rows only) keeps each source's items between runs. `formats` are the row kinds `purpose` accepts (format
    detection prefers them). Raises DataError on malformed input, on a source of the wrong format, and
    when a source has no usable rows.
    """
    if not config.sources:
        raise DataError("no training data given: pass --data PATH (or set data.sources in the config)")
    many = render_batch or one_by_one(render)
    data: TokenizedData[Item] = TokenizedData()
    for index, source in enumerate(config.sources):
        summary, kept = render_source(source, config, many, formats, purpose, cache)
        add_source(data, summary, kept, config, seed, index)
    for source in config.eval_sources:
        summary, kept = render_source(source, config, many, formats, purpose, cache)
        add_eval_source(data, summary, kept, config)
    return data


def add_source(data: TokenizedData[Item], summary: SourceSummary, kept: list[Item], config: DataConfig, seed: int,
               index: int) -> None:
    """Split one source's usable items into train and held out and add them, with its summary, to `data`.

    Raises DataError when the source has no usable item. `index` is the source's place in the mixture."""
    summary.kept = len(kept)
    if not kept:
        raise DataError(f"{summary.path}: none of its {summary.rows} rows is usable ({summary.drops()}; "
                        f"data.max_length={config.max_length}, overlong={config.overlong})")
    # keyed by the source's place in the mixture, not its path: the same data held out wherever it lives;
    # nothing is held out of the training data when held-out data is given on its own
    held = set() if config.eval_sources else split_held_out(len(kept), config.eval_fraction, config.eval_max_rows,
                                                            seed, f"source-{index}")
    data.train.extend(r for i, r in enumerate(kept) if i not in held)
    data.held_out.extend(r for i, r in enumerate(kept) if i in held)
    summary.train, summary.held_out = len(kept) - len(held), len(held)
    data.sources.append(summary)


def add_eval_source(data: TokenizedData[Item], summary: SourceSummary, kept: list[Item], config: DataConfig) -> None:
    """Add every usable item of a held-out source (data.eval_sources) to `data.held_out`, with its summary."""
    summary.kept, summary.role, summary.held_out = len(kept), "eval", len(kept)
    if not kept:
        raise DataError(f"{summary.path}: none of its {summary.rows} rows is usable ({summary.drops()}; "
                        f"data.max_length={config.max_length}, overlong={config.overlong})")
    data.held_out.extend(kept)
    data.sources.append(summary)


SFT_FORMATS = ("text", "prompt_completion", "alpaca", "messages")


def prepare_sft_data(config: DataConfig, tokenizer, seed: int = 0,
                     encoder_decoder: bool = False) -> TokenizedData[Rendered]:
    """Tokenized SFT rows (ids + loss mask) of every source, split into train and held out (rendered in
    batches: one tokenizer call per chunk of rows; kept between runs in the tokenized cache, data.cache_dir).

    For an `encoder_decoder` model the tokens before a row's first trained one are the encoder's input and the
    rest the decoder's (`tunelab.logprobs.split_for_encoder_decoder`): `text` rows, which have no prompt, and
    `data.train_on_prompt` are refused."""
    from tunelab.data.cache import TokenCache

    if encoder_decoder and config.train_on_prompt:
        raise DataError("data.train_on_prompt cannot be used with an encoder-decoder model: its prompt is the "
                        "encoder's input, and only the decoder predicts tokens")

    def render(examples: list[Example]) -> list[tuple[Rendered | None, str]]:
        if encoder_decoder:
            for example in examples:
                if example.format == "text":
                    raise DataError(f"{example.where}: 'text' rows have no prompt for the encoder of an "
                                    "encoder-decoder model; use prompt/completion, alpaca or messages rows")
        usable = [example for example in examples if has_content(example)]
        rendered = iter(render_examples(usable, tokenizer, train_on_prompt=config.train_on_prompt,
                                        chat_template=config.chat_template))
        return [fit_length(next(rendered), config.max_length, config.overlong) if has_content(example)
                else (None, "dropped_empty") for example in examples]

    return prepare_data(config, None, SFT_FORMATS, "supervised fine-tuning", seed, render_batch=render,
                        cache=TokenCache.for_config(config, tokenizer, "sft-seq2seq" if encoder_decoder else "sft"))

"""Text pairs for contrastive training: (anchor, positive, hard negatives) -> token ids, and texts to embed.

Columns: `anchor` + `positive` (or `query` + `document`, or `text1` + `text2`), and optionally
`negative` / `negatives`: one text or a list of texts. Texts are tokenized alone, the way an
embedding model reads them: for an encoder `[CLS] text [SEP]`, for a causal LM `bos + text + eos`
(the last token, which last-token pooling reads, has seen the whole text).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.config import DataConfig
from tunelab.data.dataset import SourceSummary, TokenizedData, add_eval_source, add_source
from tunelab.data.load import DataError, Row, load_rows, read_text

ALIASES = (("anchor", "positive"), ("query", "document"), ("text1", "text2"))
NEGATIVE_FIELDS = ("negative", "negatives")
TEXT_FIELDS = ("text", "sentence", "anchor", "query", "document", "positive")


@dataclass
class TextPair:
    """Token ids of an anchor, its positive and its hard negatives (each `[T]`)."""

    anchor: list[int]
    positive: list[int]
    negatives: list[list[int]] = field(default_factory=list)
    where: str = ""


def is_encoder_tokenizer(tokenizer) -> bool:
    """Encoders (BERT, MiniLM) wrap a text as [CLS] ... [SEP]; anything else is read as a causal LM."""
    return tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None


def encode_text(tokenizer, text: str, max_length: int | None) -> list[int]:
    """Token ids of one text as the embedding model reads it, at most `max_length` long (the closing
    [SEP] or EOS kept; None: no limit)."""
    if is_encoder_tokenizer(tokenizer):
        limit = {"truncation": True, "max_length": max_length} if max_length else {}
        return list(tokenizer(text, **limit)["input_ids"])
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids = (ids[:max_length - 1] if max_length else ids) + [tokenizer.eos_token_id]
    return ids[:max_length] if max_length else ids


def _text(row: Row, name: str) -> str:
    value = row.values.get(name)
    if not isinstance(value, str):
        raise DataError(f"{row.where}: field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{row.where}: field '{name}' is empty")
    return value


def pair_fields(row: Row) -> tuple[str, str]:
    """The (anchor, positive) field names of a row; a row with an anchor but no positive is an error."""
    for anchor, positive in ALIASES:
        if anchor in row.values and row.values[anchor] is not None:
            if row.values.get(positive) is None:
                raise DataError(f"{row.where}: field '{positive}' is missing (a '{anchor}' row needs its "
                                f"'{positive}'; other rows of the batch serve as negatives)")
            return anchor, positive
    raise DataError(f"{row.where}: expected 'anchor' and 'positive' fields (or 'query'/'document', "
                    f"'text1'/'text2'), got {', '.join(sorted(row.values)) or 'no fields'}")


def row_texts(row: Row) -> tuple[str, str, list[str]]:
    """(anchor, positive, hard negatives) of a row, validated."""
    anchor, positive = pair_fields(row)
    negatives: list[str] = []
    for name in NEGATIVE_FIELDS:
        value = row.values.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            negatives.append(_text(row, name))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if not isinstance(item, str) or not item.strip():
                    raise DataError(f"{row.where}: field '{name}' item {i} must be a non-empty string, got "
                                    f"{item!r}")
                negatives.append(item)
        else:
            raise DataError(f"{row.where}: field '{name}' must be a string or a list of strings, got "
                            f"{type(value).__name__}")
    return _text(row, anchor), _text(row, positive), negatives


def prepare_pair_data(config: DataConfig, tokenizer, seed: int = 0) -> TokenizedData[TextPair]:
    """Tokenized pairs of every source, split into train and held out (texts longer than
    data.max_length are truncated, or with data.overlong=drop the row is dropped and counted)."""
    if not config.sources:
        raise DataError("no training data given: pass --data PATH (or set data.sources in the config)")
    data: TokenizedData[TextPair] = TokenizedData()
    for index, source in enumerate(config.sources):
        add_source(data, *_source_pairs(source, tokenizer, config), config, seed, index)
    for source in config.eval_sources:
        add_eval_source(data, *_source_pairs(source, tokenizer, config), config)
    return data


def _source_pairs(source, tokenizer, config: DataConfig) -> tuple[SourceSummary, list[TextPair]]:
    rows = load_rows(source.path, source.split)
    summary = SourceSummary(source.path, "pairs", source.weight, rows=len(rows))
    kept: list[TextPair] = []
    for row in rows:
        anchor, positive, negatives = row_texts(row)
        texts = [anchor, positive, *negatives]
        full = [encode_text(tokenizer, t, None) for t in texts]
        long = any(len(ids) > config.max_length for ids in full)
        if long and config.overlong == "drop":
            summary.dropped_long += 1
            continue
        ids = [encode_text(tokenizer, t, config.max_length) for t in texts] if long else full
        summary.truncated += long
        kept.append(TextPair(ids[0], ids[1], ids[2:], row.where))
    return summary, kept


def load_texts(path: str) -> list[str]:
    """The texts of a file to embed: rows with `text` (or sentence / anchor / query / document /
    positive), or a plain .txt file with one text per line."""
    from pathlib import Path

    if Path(path).suffix.lower() == ".txt" and Path(path).is_file():
        texts = [line for line in read_text(Path(path)).splitlines() if line.strip()]
        if not texts:
            raise DataError(f"{path}: no texts found (the file is empty)")
        return texts
    texts = []
    for row in load_rows(path):
        name = next((f for f in TEXT_FIELDS if f in row.values), None)
        if name is None:
            raise DataError(f"{row.where}: expected a 'text' field (or one of {', '.join(TEXT_FIELDS[1:])}), "
                            f"got {', '.join(sorted(row.values)) or 'no fields'}")
        texts.append(_text(row, name))
    return texts

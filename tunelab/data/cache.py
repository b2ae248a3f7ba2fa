"""A tokenized cache between runs: the rendered rows of a source, keyed by what they were made from.

It serves every recipe that renders rows ahead of training: sft (`Rendered` rows), rm (`ScoredPair`s), dpo
(`PolicyPair`s) and kto (`FeedbackItem`s). A `Codec` turns a recipe's item into token sequences (ids and
loss mask each) and numbers (a margin, a verdict) and back.

The key is a SHA-256 over: the source's path and content (the file's bytes, or every file of a saved
`datasets` directory; rows name their path in messages), how it is read (format, split, column mapping), the tokenizer (its serialized fast
tokenizer, special tokens and the chat template in force), the settings that change rendering
(`max_length`, `overlong`, `train_on_prompt`, `chat_template`), what the rows are rendered for, and the
code that renders them (the bytes of `tunelab/data/*.py`). Change any of them and the key changes, so a
stale entry is never read. Weights, the held-out share and the seed are not in the key: the split is
made after the cache.

An entry is `<key>.npz` (token ids, masks, sequence lengths, sequences per item and each item's numbers,
read with `allow_pickle=False`: nothing in the cache runs code) and `<key>.json` (the source's summary and row locations), written to temporary names
and renamed into place. Hub datasets, whose content is not known without loading them, and tokenizers
without a fast backend are not cached. The directory is `data.cache_dir`: `auto` is `$TUNELAB_CACHE_DIR`
(`none` there turns the cache off), else `$XDG_CACHE_HOME/tunelab/tokenized`, else
`~/.cache/tunelab/tokenized`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tunelab.config import DataConfig, DataSource
from tunelab.data.templates import Rendered, resolve_chat_template

FORMAT_VERSION = 2
Sequence = tuple[list[int], list[int]]  # token ids and their loss mask


@dataclass(frozen=True)
class Codec:
    """How a recipe's items are stored: `encode(item)` -> (sequences, numbers); `decode(sequences, numbers,
    where)` -> the item. Every item of one codec may have its own count of sequences and numbers."""

    encode: Callable[[Any], tuple[list[Sequence], list[float]]]
    decode: Callable[[list[Sequence], list[float], str], Any]


RENDERED = Codec(encode=lambda row: ([(row.ids, row.mask)], []),
                 decode=lambda seqs, numbers, where: Rendered(seqs[0][0], seqs[0][1], where))
_OFF = ("", "none", "off", "false", "0")


def cache_dir(setting: str | None) -> Path | None:
    """The cache directory in force for `data.cache_dir`, or None when the cache is off."""
    if setting is None or setting.lower() in _OFF[1:]:
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    env = os.environ.get("TUNELAB_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in _OFF else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tunelab" / "tokenized"


def _hash_path(digest, path: Path) -> bool:
    """Feed a file's (or a directory's files') bytes to `digest`; False when `path` is neither."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return False
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return True


def _code_hash() -> str:
    digest = hashlib.sha256()
    for file in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer, chat_template: str | None) -> str | None:
    """A hash of everything in the tokenizer that changes rendering; None for a tokenizer without a fast backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    digest = hashlib.sha256(backend.to_str().encode())
    digest.update(json.dumps([type(tokenizer).__name__, str(tokenizer.special_tokens_map), tokenizer.eos_token_id,
                              tokenizer.bos_token_id, resolve_chat_template(tokenizer, chat_template)]).encode())
    return digest.hexdigest()


class TokenCache:
    """Rendered items of whole sources, stored between runs (see the module docstring)."""

    def __init__(self, directory: Path, config: DataConfig, tokenizer, purpose: str, codec: Codec = RENDERED):
        self.directory, self.config, self.purpose, self.codec = directory, config, purpose, codec
        self.tokenizer_hash = tokenizer_fingerprint(tokenizer, config.chat_template)
        self.code_hash = _code_hash()

    @classmethod
    def for_config(cls, config: DataConfig, tokenizer, purpose: str, codec: Codec = RENDERED) -> TokenCache | None:
        """The cache of `purpose` ('sft', 'rm', 'dpo', 'kto': part of the key) for `config`, or None when off."""
        directory = cache_dir(config.cache_dir)
        return cls(directory, config, tokenizer, purpose, codec) if directory is not None else None

    def key(self, source: DataSource) -> str | None:
        """The entry's key, or None when this source cannot be cached."""
        if self.tokenizer_hash is None:
            return None
        digest = hashlib.sha256()
        if not _hash_path(digest, Path(source.path)):
            return None  # a hub dataset
        config = self.config
        digest.update(json.dumps({
            "version": FORMAT_VERSION, "code": self.code_hash, "tokenizer": self.tokenizer_hash,
            "path": str(Path(source.path).resolve()), "purpose": self.purpose, "format": source.format, "split": source.split,
            "columns": {**config.columns, **source.columns}, "max_length": config.max_length,
            "overlong": config.overlong, "train_on_prompt": config.train_on_prompt,
            "chat_template": config.chat_template}, sort_keys=True).encode())
        return digest.hexdigest()

    def get(self, key: str, source: DataSource):
        """(summary, items) of an entry, or None when there is none (or it cannot be read)."""
        from tunelab.data.dataset import SourceSummary

        meta_path, arrays_path = self.directory / f"{key}.json", self.directory / f"{key}.npz"
        try:
            meta = json.loads(meta_path.read_text())
            with np.load(arrays_path, allow_pickle=False) as arrays:
                ids, masks, lengths, counts, numbers, number_counts = (
                    arrays[name].tolist() for name in ("ids", "masks", "lengths", "counts", "numbers",
                                                       "number_counts"))
            wheres = meta["wheres"]
            if (len(wheres) != len(counts) or len(number_counts) != len(counts) or sum(counts) != len(lengths)
                    or sum(lengths) != len(ids) or len(masks) != len(ids) or sum(number_counts) != len(numbers)):
                return None
            items, token, seq, number = [], 0, 0, 0
            for count, n_numbers, where in zip(counts, number_counts, wheres):
                sequences = []
                for length in lengths[seq:seq + count]:
                    sequences.append((ids[token:token + length], masks[token:token + length]))
                    token += length
                items.append(self.codec.decode(sequences, numbers[number:number + n_numbers], where))
                seq, number = seq + count, number + n_numbers
            summary = SourceSummary(**meta["summary"])
        except (OSError, ValueError, KeyError, TypeError, IndexError):  # no entry, or a damaged one: render again
            return None
        summary.cached, summary.weight = True, source.weight
        return summary, items

    def put(self, key: str, summary, items: list) -> str | None:
        """Store an entry; returns a warning when it cannot be written (the run goes on without it)."""
        names = {f.name for f in fields(summary)} - {"train", "held_out", "kept", "cached", "role"}
        encoded = [self.codec.encode(item) for item in items]
        sequences = [sequence for seqs, _ in encoded for sequence in seqs]
        meta = {"summary": {k: v for k, v in asdict(summary).items() if k in names},
                "wheres": [item.where for item in items]}
        arrays = {"ids": np.array([t for ids, _ in sequences for t in ids], dtype=np.int64),
                  "masks": np.array([m for _, mask in sequences for m in mask], dtype=np.int8),
                  "lengths": np.array([len(ids) for ids, _ in sequences], dtype=np.int64),
                  "counts": np.array([len(seqs) for seqs, _ in encoded], dtype=np.int64),
                  "numbers": np.array([n for _, numbers in encoded for n in numbers], dtype=np.float64),
                  "number_counts": np.array([len(numbers) for _, numbers in encoded], dtype=np.int64)}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for suffix, write in ((".npz", lambda handle: np.savez(handle, **arrays)),
                                  (".json", lambda handle: handle.write(json.dumps(meta).encode()))):
                fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
                with os.fdopen(fd, "wb") as handle:
                    write(handle)
                os.replace(tmp, self.directory / f"{key}{suffix}")  # the .json, written last, completes the entry
        except OSError as exc:
            return f"could not write the tokenized cache in {self.directory} ({exc}); rows are rendered each run"
        return None

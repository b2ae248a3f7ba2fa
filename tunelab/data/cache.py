"""A tokenized cache between runs: the rendered rows of a source, keyed by what they were made from.

The key is a SHA-256 over: the source's path and content (the file's bytes, or every file of a saved
`datasets` directory; rows name their path in messages), how it is read (format, split, column mapping), the tokenizer (its serialized fast
tokenizer, special tokens and the chat template in force), the settings that change rendering
(`max_length`, `overlong`, `train_on_prompt`, `chat_template`), what the rows are rendered for, and the
code that renders them (the bytes of `tunelab/data/*.py`). Change any of them and the key changes, so a
stale entry is never read. Weights, the held-out share and the seed are not in the key: the split is
made after the cache.

An entry is `<key>.npz` (token ids, masks and row lengths, read with `allow_pickle=False`: nothing in the
cache runs code) and `<key>.json` (the source's summary and row locations), written to temporary names
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
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from tunelab.config import DataConfig, DataSource
from tunelab.data.templates import Rendered, resolve_chat_template

FORMAT_VERSION = 1
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
    """Rendered SFT rows of whole sources, stored between runs (see the module docstring)."""

    def __init__(self, directory: Path, config: DataConfig, tokenizer, purpose: str):
        self.directory, self.config, self.purpose = directory, config, purpose
        self.tokenizer_hash = tokenizer_fingerprint(tokenizer, config.chat_template)
        self.code_hash = _code_hash()

    @classmethod
    def for_config(cls, config: DataConfig, tokenizer, purpose: str) -> TokenCache | None:
        directory = cache_dir(config.cache_dir)
        return cls(directory, config, tokenizer, purpose) if directory is not None else None

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
        """(summary, rendered rows) of an entry, or None when there is none (or it cannot be read)."""
        from tunelab.data.dataset import SourceSummary

        meta_path, arrays_path = self.directory / f"{key}.json", self.directory / f"{key}.npz"
        try:
            meta = json.loads(meta_path.read_text())
            with np.load(arrays_path, allow_pickle=False) as arrays:
                ids, masks, lengths = arrays["ids"].tolist(), arrays["masks"].tolist(), arrays["lengths"].tolist()
        except (OSError, ValueError, KeyError):  # no entry, or a damaged one: render again
            return None
        wheres = meta["wheres"]
        if len(wheres) != len(lengths) or sum(lengths) != len(ids):
            return None
        rows, start = [], 0
        for length, where in zip(lengths, wheres):
            rows.append(Rendered(ids[start:start + length], masks[start:start + length], where))
            start += length
        summary = SourceSummary(**meta["summary"])
        summary.cached, summary.weight = True, source.weight
        return summary, rows

    def put(self, key: str, summary, rows: list[Rendered]) -> str | None:
        """Store an entry; returns a warning when it cannot be written (the run goes on without it)."""
        names = {f.name for f in fields(summary)} - {"train", "held_out", "kept", "cached", "role"}
        meta = {"summary": {k: v for k, v in asdict(summary).items() if k in names}, "wheres": [r.where for r in rows]}
        arrays = {"ids": np.array([t for r in rows for t in r.ids], dtype=np.int64),
                  "masks": np.array([m for r in rows for m in r.mask], dtype=np.int8),
                  "lengths": np.array([len(r.ids) for r in rows], dtype=np.int64)}
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

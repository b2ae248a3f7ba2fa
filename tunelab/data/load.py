"""Read rows from a file, a saved `datasets` directory or a hub dataset, each tagged with where it came from.

Every row carries a location string ("reviews.jsonl line 7", "pairs.csv row 3") so that later stages
can name the exact place of a bad value.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad input data; the message names the file, the line or row, the field and what was expected."""


@dataclass
class Row:
    """One raw row and where it came from."""

    where: str
    values: dict[str, Any]


_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(path: str, split: str = "train") -> list[Row]:
    """Read all rows of a data source.

    `path` is a .jsonl/.json/.csv/.parquet file, a directory written by `datasets.save_to_disk`, or a
    hub dataset name (`owner/name`), read with the real `datasets` loader. Raises DataError for a
    missing file, malformed content or an empty source.
    """
    p = Path(path)
    if p.is_dir():
        rows = _load_saved_dataset(p, split)
    elif p.is_file():
        kind = _SUFFIXES.get(p.suffix.lower())
        if kind is None:
            raise DataError(f"{path}: unsupported file type '{p.suffix}'; expected one of "
                            f"{', '.join(sorted(_SUFFIXES))}, a saved `datasets` directory or a hub name")
        rows = {"jsonl": _load_jsonl, "json": _load_json, "csv": _load_csv, "parquet": _load_parquet}[kind](p)
    elif _looks_like_hub_name(path):
        rows = _load_hub(path, split)
    else:
        raise DataError(f"data file not found: {path}")
    if not rows:
        raise DataError(f"{path}: no rows found (the source is empty)")
    return rows


def _looks_like_hub_name(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~")) and Path(path).suffix == ""


def _require_mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object with named fields, got {type(value).__name__}")
    return value


def read_text(path: Path) -> str:
    """A data file's text (UTF-8, a byte-order mark tolerated); bytes that are not UTF-8 are a DataError naming
    the line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path} line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column "
                        f"{exc.start - line_start + 1}); save the file as UTF-8") from None


def _load_jsonl(path: Path) -> list[Row]:
    rows = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        rows.append(Row(where, _require_mapping(value, where)))
    return rows


_JSON_WRAPPERS = ("data", "rows", "examples", "records", "train")


def _load_json(path: Path) -> list[Row]:
    text = read_text(path)
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in _JSON_WRAPPERS:
        value = next(iter(value.values()))  # {"data": [...]} wrappers are common
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON array of objects (or use .jsonl), got {type(value).__name__}")
    return [Row(f"{path} row {i + 1}", _require_mapping(v, f"{path} row {i + 1}")) for i, v in enumerate(value)]


def _load_csv(path: Path) -> list[Row]:
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    if not reader.fieldnames:
        return []
    rows = []
    for i, record in enumerate(reader, start=1):
        where = f"{path} row {i} (line {reader.line_num})"
        if None in record:
            raise DataError(f"{where}: more values than the {len(reader.fieldnames)} header columns")
        rows.append(Row(where, {k: v for k, v in record.items() if v is not None}))
    return rows


def _load_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read as Parquet ({exc})") from None
    return [Row(f"{path} row {i + 1}", record) for i, record in enumerate(table.to_pylist())]


def _rows_from_dataset(dataset, label: str) -> list[Row]:
    return [Row(f"{label} row {i + 1}", dict(record)) for i, record in enumerate(dataset)]


def _load_saved_dataset(path: Path, split: str) -> list[Row]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: a directory, but not one written by `datasets.save_to_disk` ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split '{split}'; it has {', '.join(loaded)} (set the source's split)")
        loaded = loaded[split]
    return _rows_from_dataset(loaded, f"{path}[{split}]")


def _load_hub(name: str, split: str) -> list[Row]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise DataError(f"data source '{name}' is neither a local file or directory nor a dataset that "
                        f"could be loaded from the hub ({type(exc).__name__}: {exc})") from None
    return _rows_from_dataset(loaded, f"{name}[{split}]")

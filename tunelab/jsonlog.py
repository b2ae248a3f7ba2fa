"""Per-step JSONL logs (metrics.jsonl, samples.jsonl) that a reader can trust after a crash.

Each record is appended with one `write` of a whole line. A process killed mid-append can still leave
a partial last line (the kernel may have taken part of the write); readers drop such a torn last line
with a warning instead of failing, and resume rewrites the file without it. A bad line anywhere else is
damage no crash causes, and is an error naming the file and line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tunelab import pause


class JsonlError(ValueError):
    """A JSONL log holds a line that is not JSON, before its last line."""


def append_jsonl(path: Path, record: dict, pause_point: str | None = "metrics") -> None:
    """Append `record` as one line, written in one call (`pause_point`: see `tunelab.pause`)."""
    append_lines(path, [record], pause_point)


def append_lines(path: Path, records: list[dict], pause_point: str | None = None, sync: bool = False) -> None:
    """Append `records` as lines in one write call; `sync`: fsynced before returning (`pause_point`: a test
    stops there with half the bytes written, see `tunelab.pause`)."""
    data = "".join(json.dumps(record) + "\n" for record in records).encode()
    if not data:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if pause_point and pause.reached(pause_point):
            os.write(fd, data[:len(data) // 2])
            if sync:
                os.fsync(fd)
            pause.wait()
            data = data[len(data) // 2:]
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path, warn: bool = True) -> list[dict]:
    """The records of a JSONL log; a torn last line (a crash mid-append) is dropped with a warning."""
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number < len(lines):
                raise JsonlError(f"{path} line {number} is not JSON ({exc.msg}); the file is damaged") from None
            if warn:
                print(f"warning: {path} ends in a partial line (the run was stopped while writing it); "
                      "ignoring it", file=sys.stderr)
    return records


def trim_jsonl(path: Path, after_step: int) -> None:
    """Keep the records of a per-step log up to `after_step` (dropping a torn last line), rewritten whole."""
    from tunelab.checkpoint import atomic_write_text

    if not path.is_file():
        return
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= after_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

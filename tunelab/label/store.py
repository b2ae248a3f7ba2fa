"""The labels file: JSONL, one row per label, in the row format `tunelab rm` and `tunelab dpo` read.

A row:

    {"prompt": ..., "chosen": ..., "rejected": ..., "choice": "A" | "B" | "tie" | "skip",
     "chosen_source": ..., "rejected_source": ..., "labeler": ..., "time": "2025-01-31T12:00:00.123Z",
     "comment": ..., "item": KEY, "id": LABEL_ID}

`choice` is the side the labeler picked on the page (A is the left response). For a tie or a skip there is
no preference: `chosen` and `rejected` then hold the left and the right response, and tunelab's preference
loader drops such rows and counts them.

Crash safety:
- A label is one `write` of one line, flushed and fsynced (and the directory fsynced when the file is new)
  before the server acknowledges it: a label the page was told is saved survives a kill of the server. A write
  that fails (a full disk) is cut back off and answered with an error, so the page keeps the label to retry.
- An undo rewrites the file without that row: into a temporary file in the same folder, fsynced, then
  renamed over the labels file (and the folder fsynced). A kill at any moment leaves either the old file or
  the new one, never a mix, so every reader sees only current labels and needs no undo records.
- A last line cut short by a crash (power loss mid-write, never acknowledged) is cut off at the next start.
- One server writes a file at a time: it holds an exclusive lock on `FILE.lock` while it runs (the lock
  goes away with the process, however it ends).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from tunelab.label import LabelError

CHOICES = ("A", "B", "tie", "skip")


def now() -> str:
    """The current UTC time as ISO 8601 with milliseconds and a Z."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_rows(path: str | Path, repair: bool = False) -> tuple[list[dict], str | None]:
    """All rows of a labels file, in order, and a note when a cut-off last line was found.

    A last line without its newline that is not valid JSON is the trace of a write that never finished: with
    `repair` it is cut off the file, otherwise skipped. A malformed line elsewhere is an error naming it.
    """
    path = Path(path)
    if not path.exists():
        return [], None
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    rows, note = [], None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        rows.append(_parse(line, path, number))
    if tail.strip():
        try:
            rows.append(_parse(tail, path, len(lines) + 1))
            if repair:  # a complete row written by other means: end it, so the next append starts a line
                with path.open("ab") as handle:
                    handle.write(b"\n")
                    handle.flush()
                    os.fsync(handle.fileno())
        except LabelError:
            note = f"{path} line {len(lines) + 1}: a label cut off mid-write (never saved), {len(tail)} bytes"
            if repair:
                os.truncate(path, len(data) - len(tail))
                note += ", removed"
    return rows, note


def _parse(line: bytes, path: Path, number: int) -> dict:
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LabelError(f"{path} line {number}: malformed JSON ({exc}); fix or remove the line") from None
    if not isinstance(value, dict):
        raise LabelError(f"{path} line {number}: expected a JSON object, got {type(value).__name__}")
    return value


class LabelFile:
    """Appends labels to a JSONL file durably, and removes one atomically (undo)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = None

    def open(self) -> tuple[list[dict], str | None]:
        """Take the file's lock, repair a cut-off last line, and return the rows already there."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        stale = self.path.parent / f".{self.path.name}.undo-tmp"
        if stale.exists():  # an undo that was killed before its rename: the labels file is the old one, intact
            stale.unlink()
        return read_rows(self.path, repair=True)

    def _take_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform
            return
        handle = open(self.path.parent / f"{self.path.name}.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise LabelError(f"{self.path} is in use by another `tunelab label` (it holds {self.path.name}.lock); "
                             "stop that one first, or label into another --output") from None
        self._lock = handle

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def append(self, row: dict) -> None:
        """Write one row as one line, flushed and fsynced before returning. A write that fails (a full disk) is
        taken back, so the file never keeps half a row, and the error is raised: the label is not saved."""
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        new = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                written = 0
                while written < len(line):
                    written += os.write(fd, line[written:])
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
        if new:
            _fsync_dir(self.path.parent)

    def remove(self, label_id: str) -> None:
        """Rewrite the file without the row whose `id` is `label_id` (atomically: temporary file, rename)."""
        kept = []
        found = False
        for line in self.path.read_bytes().splitlines(keepends=True):
            if not found and line.strip():
                try:
                    found = json.loads(line).get("id") == label_id
                except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                    found = False
                if found:
                    continue
            kept.append(line)
        if not found:
            raise LabelError(f"label {label_id} is not in {self.path}")
        tmp = self.path.parent / f".{self.path.name}.undo-tmp"
        with open(tmp, "wb") as handle:
            handle.write(b"".join(kept))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)

"""Text and file names that come from data, metrics or the disk, made safe before they reach a terminal, a
Markdown report or a path, and OS errors turned into one readable sentence."""

from __future__ import annotations

import errno
import html
import os
import re
from pathlib import Path

# C0 controls except tab and newline, DEL, and C1 controls (0x9b alone starts an ANSI sequence on some terminals)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]")


class OutputError(OSError):
    """A result file could not be written; the message names the path and the reason."""

    def __init__(self, message: str):
        super().__init__(message)


def terminal_safe(text: str) -> str:
    """`text` with ANSI escape sequences removed and other control characters shown as `\\xNN`.

    Tabs and newlines are kept; a carriage return, which would let a line overwrite what came before it on
    the screen, is shown escaped like the rest.
    """
    text = _ANSI.sub("", str(text))
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def safe_filename(name: str, limit: int = 120) -> str:
    """A file name for `name` that stays inside its folder: no separators, no `..`, no control characters.

    Characters other than letters, digits, `-`, `_`, `.` and `+` become `_`, and so do leading dots (no hidden
    files, no `..`); an empty name becomes `_`.
    """
    cleaned = re.sub(r"[^\w.+-]", "_", str(name), flags=re.ASCII)[:limit]
    stripped = cleaned.lstrip(".")
    return "_" * (len(cleaned) - len(stripped)) + stripped or "_"


def markdown_text(text: str) -> str:
    """`text` for a Markdown table cell or heading: HTML escaped, Markdown syntax and line breaks neutralised."""
    text = html.escape(terminal_safe(text), quote=True)
    text = re.sub(r"([\\`*{}\[\]()#+!|~<>$])", r"\\\1", text)
    # an underscore inside a word (positive_share) emphasises nothing in Markdown: only those at a word's edge
    text = re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", text)
    return " ".join(text.split())


def os_error_reason(exc: OSError) -> str:
    """Why an OS call failed, in words (a full disk, a read-only file system, no permission, ...)."""
    reasons = {errno.ENOSPC: "the disk is full (no space left on the device)",
               errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.EISDIR: "it is a folder, not a file", errno.ENOTDIR: "a part of the path is not a folder",
               errno.ENOENT: "no such file or folder"}
    return reasons.get(exc.errno, exc.strerror or str(exc))


def output_error(path: str | Path, exc: OSError, what: str = "write") -> OutputError:
    """An OutputError naming `path` and the reason of `exc`."""
    return OutputError(f"cannot {what} {path}: {os_error_reason(exc)}")


def check_output_file(path: str | Path | None, flag: str = "--output", inputs: tuple = ()) -> None:
    """Refuse, before any work, an output file that names a folder, one of the command's `inputs`, or a file
    in a folder that cannot be written."""
    if not path:
        return
    path = Path(path)
    for given in inputs:
        if given and Path(given).exists() and path.resolve() == Path(given).resolve():
            raise OutputError(f"{flag} {path} is also an input of the command; writing it would replace that "
                              "input: choose another file")
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; name a file to write")
    parent = _existing_parent(path)
    if not parent.is_dir():
        raise OutputError(f"{flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: cannot write into {parent} (read-only or no "
                          "permission)")


def _existing_parent(path: Path) -> Path:
    parent = path.parent if str(path.parent) else Path(".")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent

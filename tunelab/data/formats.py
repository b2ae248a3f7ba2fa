"""Row formats: detect a source's format from its columns and validate each row into an Example.

| format              | columns                                   | trained on                      |
|---------------------|-------------------------------------------|---------------------------------|
| `text`              | text                                      | every token                     |
| `prompt_completion` | prompt, completion                        | the completion                  |
| `alpaca`            | instruction, optional input, output       | the output                      |
| `messages`          | messages: [{role, content}, ...]          | every assistant turn            |
| `preference`        | optional prompt, chosen, rejected, margin | (reward modeling, DPO)          |
| `prompt`            | prompt only                               | (PPO rollouts)                  |

A prompt, chosen or rejected value may be a string or a list of chat messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunelab.data.load import DataError, Row

FORMATS = ("text", "prompt_completion", "alpaca", "messages", "preference", "prompt")
ROLES = ("system", "user", "assistant")

Messages = list[dict[str, str]]


@dataclass
class Example:
    """A validated row. Which fields are set depends on `format`; `where` locates the source row."""

    format: str
    where: str
    text: str | None = None
    prompt: str | Messages | None = None
    completion: str | None = None
    messages: Messages | None = None
    chosen: str | Messages | None = None
    rejected: str | Messages | None = None
    margin: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def detect_format(columns: set[str], source: str) -> str:
    """Name the format that a set of columns implies; raise DataError when none fits."""
    if "messages" in columns:
        return "messages"
    if {"chosen", "rejected"} <= columns:
        return "preference"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    if "prompt" in columns:
        return "prompt"
    raise DataError(
        f"{source}: cannot tell the data format from the columns {sorted(columns)}; expected 'text', "
        "'prompt'+'completion', 'instruction'+'output' (alpaca), 'messages', or 'chosen'+'rejected' "
        "(or set the source's format explicitly)")


def _string(row: Row, key: str, optional: bool = False) -> str | None:
    if key not in row.values or row.values[key] is None:
        if optional:
            return None
        raise DataError(f"{row.where}: missing field '{key}'")
    value = row.values[key]
    if not isinstance(value, str):
        raise DataError(f"{row.where}: field '{key}' must be a string, got {type(value).__name__} ({value!r:.60})")
    return value


def _messages(row: Row, key: str, value: Any) -> Messages:
    if not isinstance(value, list) or not value:
        raise DataError(f"{row.where}: field '{key}' must be a non-empty list of {{role, content}} messages, "
                        f"got {type(value).__name__}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{row.where}: field '{key}' item {i} must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{row.where}: field '{key}' item {i} has role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise DataError(f"{row.where}: field '{key}' item {i} content must be a string, "
                            f"got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def text_or_messages(row: Row, key: str, optional: bool = False) -> str | Messages | None:
    """A field that may hold a string or a list of chat messages, validated."""
    value = row.values.get(key)
    if isinstance(value, list):
        return _messages(row, key, value)
    return _string(row, key, optional)


def to_example(row: Row, fmt: str) -> Example:
    """Validate one row against `fmt`; raise DataError naming the row and field on a bad value."""
    if fmt == "text":
        return Example(fmt, row.where, text=_string(row, "text"))
    if fmt == "prompt_completion":
        # a `label` (KTO's desirable/undesirable feedback) is kept raw: only the recipe that reads it checks it
        return Example(fmt, row.where, prompt=text_or_messages(row, "prompt"),
                       completion=_string(row, "completion"),
                       extra={"label": row.values["label"]} if "label" in row.values else {})
    if fmt == "alpaca":
        from tunelab.data.templates import alpaca_prompt

        prompt = alpaca_prompt(_string(row, "instruction"), _string(row, "input", optional=True) or "")
        return Example(fmt, row.where, prompt=prompt, completion=_string(row, "output"))
    if fmt == "messages":
        return Example(fmt, row.where, messages=_messages(row, "messages", row.values.get("messages")))
    if fmt == "preference":
        margin = row.values.get("margin", 0.0)
        if margin is None:
            margin = 0.0
        if isinstance(margin, str):
            try:
                margin = float(margin)
            except ValueError:
                raise DataError(f"{row.where}: field 'margin' must be a number, got {margin!r}") from None
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise DataError(f"{row.where}: field 'margin' must be a number, got {type(margin).__name__}")
        # a `choice` (tunelab label's A/B/tie/skip) is kept raw: the preference loaders drop ties and skips
        return Example(fmt, row.where, prompt=text_or_messages(row, "prompt", optional=True),
                       chosen=text_or_messages(row, "chosen"), rejected=text_or_messages(row, "rejected"),
                       margin=float(margin), extra={"choice": row.values["choice"]} if "choice" in row.values else {})
    if fmt == "prompt":
        return Example(fmt, row.where, prompt=text_or_messages(row, "prompt"))
    raise DataError(f"unknown data format '{fmt}'; expected one of {', '.join(FORMATS)} or auto")


def to_examples(rows: list[Row], fmt: str, source: str) -> tuple[str, list[Example]]:
    """Detect (when `fmt` is 'auto') and validate a source's rows. Returns (format, examples)."""
    if fmt == "auto":
        columns: set[str] = set()
        for row in rows[:100]:
            columns |= set(row.values)
        fmt = detect_format(columns, source)
    elif fmt not in FORMATS:
        raise DataError(f"{source}: unknown data format '{fmt}'; expected one of {', '.join(FORMATS)} or auto")
    return fmt, [to_example(row, fmt) for row in rows]

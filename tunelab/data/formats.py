"""Row formats: detect a source's format from its columns and validate each row into an Example.

| format              | columns                                                   | trained on                  |
|---------------------|-----------------------------------------------------------|-----------------------------|
| `text`              | text                                                      | every token                 |
| `prompt_completion` | prompt, completion (text, or TRL's message lists)         | the completion              |
| `alpaca`            | instruction, optional input, output, system, history      | the output                  |
| `messages`          | messages: [{role, content}, ...], optional system, tools  | every assistant turn        |
| `sharegpt`          | conversations: [{from, value}, ...], optional system, tools | every gpt / function_call turn |
| `kto`               | conversations or messages + kto_tag (or label): bool      | the last assistant turn (KTO) |
| `preference`        | chosen, rejected + a prompt: prompt, conversations        | (reward modeling, DPO, KTO) |
|                     | (ShareGPT) or instruction + input (alpaca); margin        |                             |
| `prompt`            | prompt only (text or messages)                            | (PPO / GRPO rollouts)       |

A prompt, completion, chosen or rejected value may be a string or a list of chat messages (OpenAI /
TRL `{role, content}` or ShareGPT `{from, value}`; see `tunelab.data.messages`); a chosen / rejected
value may also be one message (LLaMA-Factory's `{"from": "gpt", "value": ...}`). A `system` column puts
a system turn first in a conversation (in an alpaca prompt it replaces the preamble), a `tools` column is
passed to the chat template. Alpaca `history` ([[instruction, response], ...]) is rendered as earlier
turns of the prompt and not trained.

In a preference row with message lists the prompt is the conversation both sides share: a `prompt` that
chosen and rejected already start with is not repeated, and a `prompt` string beside chosen / rejected
conversations that carry their own user turn (H4 UltraFeedback) is read as a copy of that turn, as TRL
reads it. `kto` rows (LLaMA-Factory's KTO layout) are `prompt_completion` rows with a label: the last
assistant turn is the completion, the turns before it the prompt, `kto_tag` (or `label`) true a desirable
completion. `sharegpt` rows are `messages` rows for every recipe; `columns` maps other column names onto
these. A known column that the chosen format does not read is reported, never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunelab.config import CANONICAL_COLUMNS
from tunelab.data.load import DataError, Row
from tunelab.data.messages import ROLES, Messages, as_messages, parse_message, parse_messages, parse_tools

__all__ = ["FORMATS", "ROLES", "Example", "Messages", "SourceReading", "detect_format", "read_source",
           "text_or_messages", "to_example", "to_examples"]

FORMATS = ("text", "prompt_completion", "alpaca", "messages", "sharegpt", "kto", "preference", "prompt")
KINDS = {"sharegpt": "messages", "kto": "prompt_completion"}  # format -> the kind of Example its rows become
# columns that some format reads (or that multimodal rows carry): any of them left unread is reported
KNOWN_COLUMNS = (*CANONICAL_COLUMNS, "choice", "images", "videos", "audios")


def kind_of(fmt: str) -> str:
    return KINDS.get(fmt, fmt)


@dataclass
class Example:
    """A validated row. Which fields are set depends on `format` (a kind: sharegpt rows are `messages`);
    `where` locates the source row."""

    format: str
    where: str
    text: str | None = None
    prompt: str | Messages | None = None
    completion: str | Messages | None = None
    messages: Messages | None = None
    chosen: str | Messages | None = None
    rejected: str | Messages | None = None
    margin: float = 0.0
    tools: list[dict] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceReading:
    """How one source was read: its format, the column mapping applied, the columns read and the known
    columns left unread."""

    format: str
    examples: list[Example]
    mapping: dict[str, str] = field(default_factory=dict)
    read: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return kind_of(self.format)

    def describe(self) -> str:
        text = f"read as {self.format}: columns {', '.join(self.read) or 'none'}"
        if self.mapping:
            text += "; mapped " + ", ".join(f"{column} -> {name}" for name, column in self.mapping.items())
        if self.ignored:
            text += f"; not read: {', '.join(self.ignored)}"
        return text

    def warning(self, source: str) -> str | None:
        if not self.ignored:
            return None
        return (f"{source}: column(s) {', '.join(repr(c) for c in self.ignored)} are not read by the "
                f"'{self.format}' format and are ignored (map them with data.columns or set the source's format)")


def candidate_formats(columns: set[str]) -> list[str]:
    """The formats a set of columns fits, most specific first."""
    out = []
    pairs = {"chosen", "rejected"} <= columns
    if "messages" in columns:
        out.append("messages")
    if pairs and "conversations" in columns:  # LLaMA-Factory's ShareGPT preference rows
        out.append("preference")
    if "conversations" in columns:
        out.append("sharegpt")
    if {"messages", "conversations"} & columns and {"kto_tag", "label"} & columns:  # LLaMA-Factory's KTO rows
        out.append("kto")
    if pairs and "preference" not in out:
        out.append("preference")
    if {"instruction", "output"} <= columns:
        out.append("alpaca")
    if {"prompt", "completion"} <= columns:
        out.append("prompt_completion")
    if "text" in columns:
        out.append("text")
    if "prompt" in columns:
        out.append("prompt")
    return out


def detect_format(columns: set[str], source: str, prefer: tuple[str, ...] | None = None) -> str:
    """Name the format that a set of columns implies; raise DataError when none fits.

    With `prefer` (the kinds a recipe reads), the most specific format of those kinds wins: H4-style
    UltraFeedback rows (prompt, chosen, rejected and a `messages` copy) are preference rows for rm and dpo
    and messages rows for sft."""
    candidates = candidate_formats(columns)
    if not candidates:
        raise DataError(
            f"{source}: cannot tell the data format from the columns {sorted(columns)}; expected 'text', "
            "'prompt'+'completion', 'instruction'+'output' (alpaca), 'messages', 'conversations' (ShareGPT), or "
            "'chosen'+'rejected' (or set the source's format explicitly, or map columns with data.columns)")
    if prefer:
        return next((c for c in candidates if kind_of(c) in prefer), candidates[0])
    return candidates[0]


class _Fields:
    """A row's values, remembering which columns were read."""

    def __init__(self, row: Row, used: set[str]):
        self.row, self.where, self.used = row, row.where, used

    def has(self, key: str) -> bool:
        return self.row.values.get(key) is not None

    def get(self, key: str) -> Any:
        self.used.add(key)
        return self.row.values.get(key)

    def string(self, key: str, optional: bool = False) -> str | None:
        value = self.get(key)
        if value is None:
            if optional:
                return None
            raise DataError(f"{self.where}: missing field '{key}'")
        if not isinstance(value, str):
            raise DataError(f"{self.where}: field '{key}' must be a string, got {type(value).__name__} "
                            f"({value!r:.60})")
        return value

    def text_or_messages(self, key: str, optional: bool = False, role: str = "assistant") -> str | Messages | None:
        """A string, a list of messages, or (for a response) a single message."""
        value = self.get(key)
        if isinstance(value, list):
            return parse_messages(value, self.where, key)
        if isinstance(value, dict):
            message = parse_message(value, f"{self.where}: field '{key}'")
            if message["role"] != role:
                raise DataError(f"{self.where}: field '{key}' is a {message['role']} message; expected an "
                                f"{role} message (or a list of messages)")
            return [message]
        return self.string(key, optional)

    def with_system(self, messages: Messages) -> Messages:
        """A `system` column as the first turn of a conversation that has none."""
        system = self.string("system", optional=True)
        if system and messages[0]["role"] != "system":
            return [{"role": "system", "content": system}, *messages]
        return messages

    def tools(self) -> list[dict] | None:
        return parse_tools(self.get("tools"), self.where) if self.has("tools") else None

    def conversation(self, key: str) -> Messages:
        return self.with_system(parse_messages(self.get(key), self.where, key))

    def chat_or_text(self, key: str, optional: bool = False) -> str | Messages | None:
        value = self.text_or_messages(key, optional, role="user")
        return self.with_system(value) if isinstance(value, list) else value


def text_or_messages(row: Row, key: str, optional: bool = False) -> str | Messages | None:
    """A field that may hold a string or a list of chat messages, validated."""
    return _Fields(row, set()).text_or_messages(key, optional)


def _history(fields: _Fields) -> list[tuple[str, str]]:
    value = fields.get("history")
    if value is None:
        return []
    if not isinstance(value, list):
        raise DataError(f"{fields.where}: field 'history' must be a list of [instruction, response] pairs, "
                        f"got {type(value).__name__}")
    pairs = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise DataError(f"{fields.where}: field 'history' item {i} must be an [instruction, response] pair of "
                            f"strings, got {pair!r:.60}")
        pairs.append((pair[0], pair[1]))
    return pairs


def _alpaca(fields: _Fields, instruction: str) -> str:
    from tunelab.data.templates import alpaca_prompt

    return alpaca_prompt(instruction, fields.string("input", optional=True) or "",
                         system=fields.string("system", optional=True), history=_history(fields))


def _margin(fields: _Fields) -> float:
    margin = fields.get("margin")
    if margin is None:
        return 0.0
    if isinstance(margin, str):
        try:
            return float(margin)
        except ValueError:
            raise DataError(f"{fields.where}: field 'margin' must be a number, got {margin!r}") from None
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise DataError(f"{fields.where}: field 'margin' must be a number, got {type(margin).__name__}")
    return float(margin)


def _preference_prompt(fields: _Fields) -> str | Messages | None:
    if fields.has("prompt"):
        return fields.chat_or_text("prompt")
    if fields.has("conversations"):
        return fields.conversation("conversations")
    if fields.has("instruction"):
        return _alpaca(fields, fields.string("instruction"))
    return None


def shared_prompt(prompt: str | Messages | None, chosen: str | Messages, rejected: str | Messages,
                  where: str) -> tuple[str | Messages | None, str | Messages, str | Messages]:
    """(prompt, chosen, rejected) with the prompt as the turns both sides share and each side its own reply.

    Text pairs are returned as they are. With message lists: chosen / rejected that start with the prompt's
    turns lose them (no turn is rendered twice); a prompt string beside sides that carry their own
    user turn is a copy of it; with no prompt, the prompt is the longest shared history. Each side must
    then start and end with an assistant turn."""
    if not any(isinstance(v, list) for v in (prompt, chosen, rejected)):
        return prompt, chosen, rejected
    chosen, rejected = as_messages(chosen, "assistant"), as_messages(rejected, "assistant")
    if not chosen or not rejected:
        return as_messages(prompt, "user"), chosen, rejected
    own_turns = chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant"
    if isinstance(prompt, str):
        prompt = None if own_turns else as_messages(prompt, "user")
    implicit = prompt is None
    if prompt and chosen[:len(prompt)] == prompt and rejected[:len(prompt)] == prompt:
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    elif implicit:
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages or messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: field '{side}' must end with an assistant message")
        if messages[0]["role"] != "assistant" and implicit:
            raise DataError(f"{where}: without a 'prompt', 'chosen' and 'rejected' must share every message before "
                            "their replies (the prompt is their common history)")
        if messages[0]["role"] != "assistant":
            raise DataError(f"{where}: field '{side}' must continue the 'prompt' with an assistant message (or start "
                            "with the prompt's messages)")
    return prompt, chosen, rejected


def _kto(fields: _Fields) -> Example:
    """A LLaMA-Factory KTO row: a conversation whose last assistant turn is the completion, with a verdict."""
    key = "conversations" if fields.has("conversations") else "messages"
    messages = fields.conversation(key)
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise DataError(f"{fields.where}: field '{key}' of a KTO row must end with the assistant turn that is "
                        "judged, after at least one prompt turn")
    tag = "kto_tag" if fields.has("kto_tag") or not fields.has("label") else "label"
    return Example("prompt_completion", fields.where, prompt=messages[:-1], completion=messages[-1:],
                   tools=fields.tools(), extra={"label": fields.get(tag), "label_field": tag})


def _read(fields: _Fields, fmt: str) -> Example:
    where = fields.where
    if fmt == "text":
        return Example(fmt, where, text=fields.string("text"))
    if fmt == "prompt_completion":
        prompt, completion = fields.chat_or_text("prompt"), fields.text_or_messages("completion")
        # a `label` (KTO's desirable/undesirable feedback) is kept raw: only the recipe that reads it checks it
        label = {"label": fields.get("label")} if fields.has("label") else {}
        chat = isinstance(prompt, list) or isinstance(completion, list)
        return Example(fmt, where, prompt=prompt, completion=completion, extra=label,
                       tools=fields.tools() if chat else None)
    if fmt == "alpaca":
        return Example(fmt, where, prompt=_alpaca(fields, fields.string("instruction")),
                       completion=fields.string("output"))
    if fmt in ("messages", "sharegpt"):
        key = "messages" if fmt == "messages" else "conversations"
        return Example("messages", where, messages=fields.conversation(key), tools=fields.tools())
    if fmt == "kto":
        return _kto(fields)
    if fmt == "preference":
        prompt, chosen, rejected = shared_prompt(_preference_prompt(fields), fields.text_or_messages("chosen"),
                                                 fields.text_or_messages("rejected"), where)
        chat = isinstance(chosen, list)
        # a `choice` (tunelab label's A/B/tie/skip) is kept raw: the preference loaders drop ties and skips
        return Example(fmt, where, prompt=prompt, chosen=chosen, rejected=rejected, margin=_margin(fields),
                       tools=fields.tools() if chat else None,
                       extra={"choice": fields.get("choice")} if fields.has("choice") else {})
    if fmt == "prompt":
        prompt = fields.chat_or_text("prompt")
        return Example(fmt, where, prompt=prompt, tools=fields.tools() if isinstance(prompt, list) else None)
    raise DataError(f"unknown data format '{fmt}'; expected one of {', '.join(FORMATS)} or auto")


def to_example(row: Row, fmt: str) -> Example:
    """Validate one row against `fmt`; raise DataError naming the row and field on a bad value."""
    return _read(_Fields(row, set()), fmt)


def map_columns(rows: list[Row], mapping: dict[str, str], source: str) -> tuple[list[Row], list[str]]:
    """Rows with their columns renamed by `mapping` (canonical name -> the source's column), and the
    canonical columns the mapping displaced. A mapped column that no row has is an error naming it."""
    if not mapping:
        return rows, []
    columns: set[str] = set()
    for row in rows:
        columns |= set(row.values)
    for name, column in mapping.items():
        if column not in columns:
            raise DataError(f"{source}: column '{column}' (mapped to '{name}' by data.columns) is not in the data; "
                            f"its columns are {sorted(columns)}")
    displaced = sorted(name for name in mapping if name in columns and name not in mapping.values())
    renamed = []
    for row in rows:
        values = {k: v for k, v in row.values.items() if k not in mapping and k not in mapping.values()}
        values.update({name: row.values[column] for name, column in mapping.items() if column in row.values})
        renamed.append(Row(row.where, values))
    return renamed, displaced


def read_source(rows: list[Row], fmt: str, source: str, columns: dict[str, str] | None = None,
                prefer: tuple[str, ...] | None = None) -> SourceReading:
    """Map columns, detect the format (when `fmt` is 'auto'; `prefer` as in `detect_format`), validate every
    row, and note which known columns were left unread."""
    mapping = dict(columns or {})
    rows, displaced = map_columns(rows, mapping, source)
    present: set[str] = set()
    for row in rows:
        present |= {k for k, v in row.values.items() if v is not None}
    if fmt == "auto":
        head: set[str] = set()
        for row in rows[:100]:
            head |= set(row.values)
        fmt = detect_format(head, source, prefer)
    elif fmt not in FORMATS:
        raise DataError(f"{source}: unknown data format '{fmt}'; expected one of {', '.join(FORMATS)} or auto")
    used: set[str] = set()
    examples = [_read(_Fields(row, used), fmt) for row in rows]
    shown = {name: column for name, column in mapping.items()}  # report the source's own column names
    read = sorted(shown.get(c, c) for c in used & present)
    ignored = sorted({shown.get(c, c) for c in present - used if c in KNOWN_COLUMNS} | set(displaced))
    return SourceReading(fmt, examples, mapping, read, ignored)


def to_examples(rows: list[Row], fmt: str, source: str) -> tuple[str, list[Example]]:
    """Detect (when `fmt` is 'auto') and validate a source's rows. Returns (format, examples)."""
    reading = read_source(rows, fmt, source)
    return reading.format, reading.examples

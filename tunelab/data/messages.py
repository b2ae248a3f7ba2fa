"""Chat messages from the shapes datasets hold them in, validated into one form.

The one form is a list of `{"role", "content"}` dicts, role one of system / user / assistant / tool,
content a string. An assistant turn may also carry `tool_calls` (`[{"type": "function", "function":
{"name", "arguments"}}]`, arguments a dict when they are JSON), a tool turn `name` / `tool_call_id`.

Accepted shapes, per message:

- OpenAI / TRL: `{"role", "content"}`. Content may be a list of parts (`[{"type": "text", "text": ...}]`):
  the text parts are joined with nothing between them (as chat templates join them); any other part
  type (an image, audio) is an error, since tunelab trains on text. An assistant turn with `tool_calls`
  may have `content: null`.
- ShareGPT (LLaMA-Factory): `{"from", "value"}`, `from` one of human / gpt / system / function_call /
  observation (user and assistant too). `function_call` becomes an assistant turn whose `tool_calls`
  are parsed from the value, a JSON `{"name", "arguments"}` object or a list of them; `observation`
  becomes a `tool` turn. The chat template then writes them as it writes any tool call and tool result.
"""

from __future__ import annotations

import json
from typing import Any

from tunelab.data.load import DataError

Message = dict[str, Any]
Messages = list[Message]

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool"}


def _content(value: Any, label: str) -> str:
    """A content string, or the text parts of an OpenAI content list joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                shown = f"type {kind!r}" if kind else f"{type(part).__name__} ({part!r:.40})"
                raise DataError(f"{label} content part {j} has {shown}; only text parts "
                                "({\"type\": \"text\", \"text\": ...}) can be trained on")
            texts.append(part["text"])
        return "".join(texts)
    raise DataError(f"{label} content must be a string or a list of text parts, got {type(value).__name__}")


def _tool_call(value: Any, label: str) -> dict:
    """One tool call as `{"type": "function", "function": {"name", "arguments"}}`."""
    function = value.get("function", value) if isinstance(value, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise DataError(f"{label} must be a tool call with a 'name' and 'arguments' "
                        f"(or {{'function': {{...}}}}), got {value!r:.80}")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:  # templates write dict arguments as JSON; a JSON string is read as the dict it holds
            parsed = json.loads(arguments)
            arguments = parsed if isinstance(parsed, dict) else arguments
        except json.JSONDecodeError:
            pass
    call = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        call["id"] = value["id"]
    return call


def _sharegpt_calls(value: str, label: str) -> list[dict]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise DataError(f"{label} (function_call) must hold a JSON tool call {{\"name\": ..., \"arguments\": "
                        f"...}} or a list of them ({exc.msg} at column {exc.colno})") from None
    return [_tool_call(call, label) for call in (parsed if isinstance(parsed, list) else [parsed])]


def parse_message(item: Any, label: str) -> Message:
    """One message in either shape, validated; `label` names it in errors ("x.jsonl line 3: field
    'messages' item 2")."""
    if isinstance(item, dict) and "from" in item and "value" in item and "role" not in item:
        tag = item["from"]
        role = SHAREGPT_ROLES.get(tag) if isinstance(tag, str) else None
        if role is None:
            raise DataError(f"{label} has from {tag!r}; expected one of {tuple(SHAREGPT_ROLES)}")
        if not isinstance(item["value"], str):
            raise DataError(f"{label} value must be a string, got {type(item['value']).__name__}")
        if tag == "function_call":
            return {"role": "assistant", "content": "", "tool_calls": _sharegpt_calls(item["value"], label)}
        return {"role": role, "content": item["value"]}
    if not isinstance(item, dict) or "role" not in item or ("content" not in item and "tool_calls" not in item):
        raise DataError(f"{label} must be an object with 'role' and 'content' (or ShareGPT's 'from' and 'value')")
    role = item["role"]
    if role not in ROLES:
        raise DataError(f"{label} has role {role!r}; expected one of {ROLES}")
    calls = item.get("tool_calls") or []
    if calls and role != "assistant":
        raise DataError(f"{label}: only an assistant message can have 'tool_calls'")
    if not isinstance(calls, list):
        raise DataError(f"{label} tool_calls must be a list, got {type(calls).__name__}")
    content = item.get("content")
    message: Message = {"role": role, "content": "" if content is None and calls else _content(content, label)}
    if calls:
        message["tool_calls"] = [_tool_call(call, f"{label} tool call {k}") for k, call in enumerate(calls)]
    if role == "tool":
        message.update({key: item[key] for key in ("name", "tool_call_id") if isinstance(item.get(key), str)})
    return message


def parse_messages(value: Any, where: str, field: str) -> Messages:
    """A non-empty list of messages in either shape, validated."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of {{role, content}} messages, "
                        f"got {type(value).__name__}")
    return [parse_message(item, f"{where}: field '{field}' item {i}") for i, item in enumerate(value)]


def parse_tools(value: Any, where: str, field: str = "tools") -> list[dict] | None:
    """The tool definitions of a row (a list, or a JSON string of one, as LLaMA-Factory writes them), each as
    `{"type": "function", "function": {...}}`; None when there are none."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: field '{field}' must be a list of tool definitions (or a JSON string of "
                            f"one): {exc.msg} at column {exc.colno}") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{field}' must be a list of tool definitions, got {type(value).__name__}")
    tools = []
    for i, tool in enumerate(value):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(f"{where}: field '{field}' item {i} must be a tool definition with a 'name' "
                            f"(or {{'type': 'function', 'function': {{...}}}}), got {tool!r:.80}")
        tools.append({"type": "function", "function": function})
    return tools


def tool_names(tools: list[dict] | None) -> list[str]:
    return [tool["function"]["name"] for tool in tools or ()]


def call_names(messages: Messages) -> list[str]:
    return [call["function"]["name"] for m in messages for call in m.get("tool_calls") or ()]


def has_reply(messages: Messages) -> bool:
    """True when some assistant turn says something (text or a tool call)."""
    return any(m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls")) for m in messages)


def as_messages(value: str | Messages | None, role: str) -> Messages:
    """A text as one message of `role`, messages as they are, nothing as no message."""
    if value is None or value == "":
        return []
    return value if isinstance(value, list) else [{"role": role, "content": value}]

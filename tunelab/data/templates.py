"""Render examples to token ids and a loss mask.

The mask comes from the rendering itself: a conversation is rendered as a sequence of segments
(prompt text, trained text, ...), each tokenized on its own, so the trained span is known exactly,
with no searching for marker strings in the token stream. `mask[t] == 1` means "the loss includes
predicting `ids[t]` from `ids[:t]`"; `mask[0]` is always 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tunelab.data.formats import Example, Messages
from tunelab.data.load import DataError
from tunelab.data.messages import as_messages, call_names, has_reply, tool_names

ALPACA_PREAMBLE = "Below is an instruction that describes a task. "
ALPACA_INPUT_PREAMBLE = ("Below is an instruction that describes a task, paired with an input that provides further "
                         "context. ")
ALPACA_REQUEST = "Write a response that appropriately completes the request.\n\n"
ALPACA_WITH_INPUT = ALPACA_INPUT_PREAMBLE + ALPACA_REQUEST + (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ALPACA_PREAMBLE + ALPACA_REQUEST + "### Instruction:\n{instruction}\n\n### Response:\n"

# ChatML; tool definitions go into the system turn and tool calls are written as <tool_call> JSON, as the
# Hermes / Qwen templates write them
CHATML_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n\nYou may call one or more functions to assist with the user query. The functions are:\n<tools>' }}"
    "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\n</tools>\n\nFor each call, return a JSON object with the function name and arguments within "
    "<tool_call></tool_call> tags.<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if not (tools and loop.first and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% if message['content'] or not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    "{% if call['function']['arguments'] is string %}{{ call['function']['arguments'] }}"
    "{% else %}{{ call['function']['arguments'] | tojson }}{% endif %}"
    "{{ '}\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def alpaca_prompt(instruction: str, input_text: str = "", system: str | None = None,
                  history: list[tuple[str, str]] | tuple = ()) -> str:
    """The Alpaca-style prompt for an instruction and optional input; the response follows it.

    A `system` text replaces the preamble ("Below is an instruction ..."); `history` pairs of (instruction,
    response) come first as earlier "### Instruction / ### Response" turns (context, not trained)."""
    if not system and not history:
        if input_text.strip():
            return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
        return ALPACA_NO_INPUT.format(instruction=instruction)
    if system:
        preamble = system.rstrip("\n") + "\n\n"
    else:
        preamble = (ALPACA_INPUT_PREAMBLE if input_text.strip() else ALPACA_PREAMBLE) + ALPACA_REQUEST
    turns = "".join(f"### Instruction:\n{q}\n\n### Response:\n{a}\n\n" for q, a in history)
    current = f"### Instruction:\n{instruction}\n\n"
    if input_text.strip():
        current += f"### Input:\n{input_text}\n\n"
    return preamble + turns + current + "### Response:\n"


@dataclass
class Rendered:
    """Token ids `[T]` and the loss mask `[T]` (1 = trained) of one example."""

    ids: list[int]
    mask: list[int]
    where: str = ""

    @property
    def trained_tokens(self) -> int:
        return sum(self.mask)


def resolve_chat_template(tokenizer, chat_template: str | None) -> str | None:
    """The Jinja template in force: an explicit one, 'chatml', or the tokenizer's own (may be None)."""
    if chat_template == "chatml":
        return CHATML_TEMPLATE
    return chat_template or getattr(tokenizer, "chat_template", None)


def render_chat(tokenizer, template: str, messages: Messages, add_generation_prompt: bool,
                tools: list[dict] | None = None, where: str = "") -> str:
    """Messages rendered to text with a Jinja chat template (`tools` passed to it as `tools`).

    A template that leaves out a tool call or a tool definition would train on a conversation that is
    not the data's: that is a DataError naming `where`."""
    text = tokenizer.apply_chat_template(messages, tools=tools or None, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return _checked(text, messages, tools, where)


def _checked(text: str, messages: Messages, tools: list[dict] | None, where: str) -> str:
    for name in call_names(messages):
        if name not in text:
            raise DataError(f"{where}: the chat template does not write tool calls (the call of '{name}' is missing "
                            "from the rendered text); set data.chat_template to a template that renders "
                            "`tool_calls` (data.chat_template=chatml does)")
    for name in tool_names(tools):
        if name not in text:
            raise DataError(f"{where}: the chat template does not write the 'tools' column (tool '{name}' is "
                            "missing from the rendered text); set data.chat_template to a template that renders "
                            "`tools` (data.chat_template=chatml does)")
    return text


# template, messages, add_generation_prompt, tools, where
ChatRequest = tuple[str, Messages, bool, "list[dict] | None", str]


def render_chats(tokenizer, requests: list[ChatRequest]) -> list[str]:
    """`render_chat` of many requests at once: one `apply_chat_template` call on the list of conversations
    for each (template, generation prompt, tools) among them, which skips the per-call work of rendering
    them one by one; the texts are those `render_chat` gives (and a template's own error, such as
    `raise_exception`, is raised as it is). An empty conversation is the generation prompt alone (some
    templates refuse it: then nothing)."""
    out: list[str | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    alone: dict[tuple, str] = {}
    for index, (template, messages, generation, tools, _) in enumerate(requests):
        tools_key = json.dumps(tools, sort_keys=True, default=str) if tools else None
        if not messages:
            if (template, tools_key) not in alone:
                alone[template, tools_key] = _generation_only(tokenizer, template, tools)
            out[index] = alone[template, tools_key]
            continue
        groups.setdefault((template, generation, tools_key), []).append(index)
    for (template, generation, _), indices in groups.items():
        tools = requests[indices[0]][3]
        texts = tokenizer.apply_chat_template([requests[i][1] for i in indices], tools=tools or None,
                                              chat_template=template, tokenize=False, add_generation_prompt=generation)
        for i, text in zip(indices, texts):
            out[i] = _checked(text, requests[i][1], tools, requests[i][4])
    return out


def require_chat_template(tokenizer, chat_template: str | None, where: str) -> str:
    """The chat template in force, or a DataError naming `where` when there is none."""
    template = resolve_chat_template(tokenizer, chat_template)
    if not template:
        raise DataError(f"{where}: chat messages need a chat template, and the tokenizer has none; "
                        "set data.chat_template (a Jinja string, or 'chatml') or use prompt/completion rows")
    return template


def prompt_text(prompt: str | Messages, tokenizer, chat_template: str | None = None, where: str = "",
                tools: list[dict] | None = None) -> str:
    """The text a model continues from: a string as is, or messages rendered with the generation prompt."""
    if isinstance(prompt, str):
        return prompt
    return render_chat(tokenizer, require_chat_template(tokenizer, chat_template, where), prompt, True, tools, where)


def tokenize(tokenizer, text: str, special: bool = False) -> list[int]:
    """Token ids of `text`; with `special`, the tokenizer's own additions (e.g. BOS) included."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"]) if text else []


def _turn_requests(messages: Messages, template: str, tools: list[dict] | None, where: str) -> list[ChatRequest]:
    """What `_conversation_segments` renders: for each assistant turn the conversation before it (with the
    generation prompt) and up to its end."""
    requests: list[ChatRequest] = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            requests += [(template, messages[:i], True, tools, where),
                         (template, messages[: i + 1], False, tools, where)]
    return requests


def _conversation_segments(messages: Messages, texts: list[str], where: str,
                           trained_from: int) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, trained) segments, one per assistant turn boundary; `texts`
    are the renders of its `_turn_requests`, in order.

    Assistant turns at index >= `trained_from` are trained, including the end-of-turn text the
    template writes after them (the model must learn to stop).
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    for k, i in enumerate(turns):
        before, after = texts[2 * k], texts[2 * k + 1]
        if not before.startswith(done) or not after.startswith(before):
            raise DataError(f"{where}: the chat template does not render this conversation as a growing prefix "
                            "turn by turn, so the assistant tokens cannot be located exactly; set "
                            "data.chat_template to a template without history rewriting")
        segments.append((before[len(done):], False))
        segments.append((after[len(before):], i >= trained_from))
        done = after
    return segments


def _generation_only(tokenizer, template: str, tools: list[dict] | None = None) -> str:
    try:
        return render_chat(tokenizer, template, [], True, tools)
    except Exception:  # some templates refuse an empty conversation; then nothing precedes the turn
        return ""


Segment = tuple[str | None, bool, bool]  # (text, or None for the EOS token; trained; with BOS etc. added)


def _chat(example: Example, tokenizer, chat_template: str | None) -> tuple[Messages, int, str] | None:
    """(messages, index of the first trained turn, template) of a chat example; None for a text one."""
    if example.format == "messages":
        messages, trained_from = example.messages, 0
    elif example.format == "prompt_completion" and (isinstance(example.prompt, list)
                                                    or isinstance(example.completion, list)):
        prompt = as_messages(example.prompt, "user")  # trained on the completion's assistant turns only
        messages, trained_from = prompt + as_messages(example.completion, "assistant"), len(prompt)
    else:
        return None
    return messages, trained_from, require_chat_template(tokenizer, chat_template, example.where)


def _text_segments(example: Example) -> list[Segment]:
    if example.format == "text":
        return [(example.text, True, True), (None, True, False)]
    if example.format in ("prompt_completion", "alpaca"):
        return [(example.prompt, False, True), (example.completion, True, False), (None, True, False)]
    raise DataError(f"{example.where}: '{example.format}' rows cannot be used for supervised fine-tuning; "
                    "use prompt/completion, alpaca, messages or text rows")


def examples_segments(examples: list[Example], tokenizer, chat_template: str | None = None) -> list[list[Segment]]:
    """The pieces of each SFT example in order, each to be tokenized on its own: what `render_examples`
    trains on. The chat templates of every chat example are rendered together (`render_chats`)."""
    chats = [_chat(example, tokenizer, chat_template) for example in examples]
    requests = [_turn_requests(chat[0], chat[2], example.tools, example.where) if chat else []
                for example, chat in zip(examples, chats)]
    texts = iter(render_chats(tokenizer, [r for rows in requests for r in rows]))
    out = []
    for example, chat, rows in zip(examples, chats, requests):
        if chat is None:
            out.append(_text_segments(example))
            continue
        mine = [next(texts) for _ in rows]
        out.append([(text, trained, False) for text, trained in
                    _conversation_segments(chat[0], mine, example.where, chat[1])])
    return out


def example_segments(example: Example, tokenizer, chat_template: str | None = None) -> list[Segment]:
    """The pieces of one SFT example in order, each tokenized on its own: what `render_example` trains on."""
    return examples_segments([example], tokenizer, chat_template)[0]


def render_examples(examples: list[Example], tokenizer, *, train_on_prompt: bool = False,
                    chat_template: str | None = None) -> list[Rendered]:
    """`render_example` for many examples at once: their chat templates rendered in one `apply_chat_template`
    call on the list of conversations (`render_chats`), then every piece of every example tokenized in one
    batched call of the tokenizer (two: with and without its special additions), which a fast tokenizer
    runs much faster than one call per piece. The ids and masks are those of `render_example`."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; set one (tokenizer.eos_token) before training")
    plans = examples_segments(examples, tokenizer, chat_template)
    encoded = {}
    for special in (False, True):
        texts = [text for plan in plans for text, _, with_special in plan if text and with_special == special]
        encoded[special] = iter(tokenizer(texts, add_special_tokens=special)["input_ids"] if texts else ())
    out = []
    for example, plan in zip(examples, plans):
        ids: list[int] = []
        mask: list[int] = []
        for text, trained, special in plan:
            token_ids = [eos] if text is None else list(next(encoded[special])) if text else []
            ids.extend(token_ids)
            mask.extend([1 if trained else 0] * len(token_ids))
        if train_on_prompt:
            mask = [1] * len(ids)
        if mask:
            mask[0] = 0  # nothing predicts the first token
        out.append(Rendered(ids, mask, example.where))
    return out


def render_example(example: Example, tokenizer, *, train_on_prompt: bool = False,
                   chat_template: str | None = None) -> Rendered:
    """Tokenize an SFT example into ids and the exact loss mask.

    Text rows train on every token. Prompt/completion and Alpaca rows train on the completion and
    the EOS token after it. Message rows train on every assistant turn. With `train_on_prompt`,
    every token is trained.
    """
    return render_examples([example], tokenizer, train_on_prompt=train_on_prompt, chat_template=chat_template)[0]


def has_content(example: Example) -> bool:
    """False for rows that are valid but give nothing to learn: an empty completion or no assistant turn."""
    if example.format == "text":
        return bool(example.text.strip())
    if example.format in ("prompt_completion", "alpaca"):
        if isinstance(example.completion, list):
            return has_reply(example.completion)
        return bool(example.completion.strip())
    if example.format == "messages":
        return has_reply(example.messages)
    return True


def fit_length(rendered: Rendered, max_length: int, overlong: str) -> tuple[Rendered | None, str]:
    """Apply the max_length policy. Returns (rendered or None, one of kept/truncated/dropped_long)."""
    if len(rendered.ids) <= max_length:
        return rendered, "kept"
    if overlong == "drop":
        return None, "dropped_long"
    cut = Rendered(rendered.ids[:max_length], rendered.mask[:max_length], rendered.where)
    if cut.trained_tokens == 0:
        return None, "dropped_long"  # the prompt alone fills max_length: nothing left to learn
    return cut, "truncated"

"""Render examples to token ids and a loss mask.

The mask comes from the rendering itself: a conversation is rendered as a sequence of segments
(prompt text, trained text, ...), each tokenized on its own, so the trained span is known exactly,
with no searching for marker strings in the token stream. `mask[t] == 1` means "the loss includes
predicting `ids[t]` from `ids[:t]`"; `mask[0]` is always 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.data.formats import Example, Messages
from tunelab.data.load import DataError

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca-style prompt for an instruction and optional input; the response follows it."""
    if input_text.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


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


def render_chat(tokenizer, template: str, messages: Messages, add_generation_prompt: bool) -> str:
    """Messages rendered to text with a Jinja chat template."""
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def require_chat_template(tokenizer, chat_template: str | None, where: str) -> str:
    """The chat template in force, or a DataError naming `where` when there is none."""
    template = resolve_chat_template(tokenizer, chat_template)
    if not template:
        raise DataError(f"{where}: chat messages need a chat template, and the tokenizer has none; "
                        "set data.chat_template (a Jinja string, or 'chatml') or use prompt/completion rows")
    return template


def prompt_text(prompt: str | Messages, tokenizer, chat_template: str | None = None, where: str = "") -> str:
    """The text a model continues from: a string as is, or messages rendered with the generation prompt."""
    if isinstance(prompt, str):
        return prompt
    return render_chat(tokenizer, require_chat_template(tokenizer, chat_template, where), prompt, True)


def tokenize(tokenizer, text: str, special: bool = False) -> list[int]:
    """Token ids of `text`; with `special`, the tokenizer's own additions (e.g. BOS) included."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"]) if text else []


def _conversation_segments(messages: Messages, tokenizer, template: str, where: str,
                           trained_from: int) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, trained) segments, one per assistant turn boundary.

    Assistant turns at index >= `trained_from` are trained, including the end-of-turn text the
    template writes after them (the model must learn to stop).
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, template, messages[:i], True) if i else _generation_only(tokenizer, template)
        after = render_chat(tokenizer, template, messages[: i + 1], False)
        if not before.startswith(done) or not after.startswith(before):
            raise DataError(f"{where}: the chat template does not render this conversation as a growing prefix "
                            "turn by turn, so the assistant tokens cannot be located exactly; set "
                            "data.chat_template to a template without history rewriting")
        segments.append((before[len(done):], False))
        segments.append((after[len(before):], i >= trained_from))
        done = after
    return segments


def _generation_only(tokenizer, template: str) -> str:
    try:
        return render_chat(tokenizer, template, [], True)
    except Exception:  # some templates refuse an empty conversation; then nothing precedes the turn
        return ""


def render_example(example: Example, tokenizer, *, train_on_prompt: bool = False,
                   chat_template: str | None = None) -> Rendered:
    """Tokenize an SFT example into ids and the exact loss mask.

    Text rows train on every token. Prompt/completion and Alpaca rows train on the completion and
    the EOS token after it. Message rows train on every assistant turn. With `train_on_prompt`,
    every token is trained.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; set one (tokenizer.eos_token) before training")
    ids: list[int] = []
    mask: list[int] = []

    def add(token_ids: list[int], trained: bool) -> None:
        ids.extend(token_ids)
        mask.extend([1 if trained else 0] * len(token_ids))

    if example.format == "text":
        add(tokenize(tokenizer, example.text, special=True) + [eos], True)
    elif example.format == "messages" or (example.format == "prompt_completion"
                                          and not isinstance(example.prompt, str)):
        if example.format == "messages":
            messages, trained_from = example.messages, 0
        else:
            messages = [*example.prompt, {"role": "assistant", "content": example.completion}]
            trained_from = len(messages) - 1
        template = require_chat_template(tokenizer, chat_template, example.where)
        for text, trained in _conversation_segments(messages, tokenizer, template, example.where, trained_from):
            add(tokenize(tokenizer, text), trained)
    elif example.format in ("prompt_completion", "alpaca"):
        add(tokenize(tokenizer, example.prompt, special=True), False)
        add(tokenize(tokenizer, example.completion) + [eos], True)
    else:
        raise DataError(f"{example.where}: '{example.format}' rows cannot be used for supervised fine-tuning; "
                        "use prompt/completion, alpaca, messages or text rows")
    if train_on_prompt:
        mask = [1] * len(ids)
    if mask:
        mask[0] = 0  # nothing predicts the first token
    return Rendered(ids, mask, example.where)


def has_content(example: Example) -> bool:
    """False for rows that are valid but give nothing to learn: an empty completion or no assistant turn."""
    if example.format == "text":
        return bool(example.text.strip())
    if example.format in ("prompt_completion", "alpaca"):
        return bool(example.completion.strip())
    if example.format == "messages":
        return any(m["role"] == "assistant" and m["content"].strip() for m in example.messages)
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

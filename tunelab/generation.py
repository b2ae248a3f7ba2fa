"""`tunelab generate` and `tunelab chat`: prompts from a file to JSONL responses, and a streaming terminal chat."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from tunelab.checkpoint import write_output
from tunelab.data.formats import Example, to_examples
from tunelab.data.load import DataError, load_rows
from tunelab.data.templates import prompt_text, render_chat, require_chat_template
from tunelab.modeling import load_for_inference
from tunelab.rollout import generate
from tunelab.safety import terminal_safe


@dataclass
class GenerationOptions:
    """Decoding parameters; temperature 0 is greedy (beam search with num_beams > 1)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    max_new_tokens: int = 128
    seed: int | None = 0
    batch_size: int = 16


@dataclass
class PromptRow:
    """A prompt ready for generation, with the reference completion when the data has one."""

    where: str
    prompt: str
    reference: str | None = None


def prompt_examples(path: str) -> list[Example]:
    """The rows of a prompts file, read and checked (no model or tokenizer needed, so bad data fails first)."""
    return to_examples(load_rows(path), "auto", path)[1]


def prompt_rows(path: str | list[Example], tokenizer, chat_template: str | None = None) -> list[PromptRow]:
    """Prompts (and references) from prompt, prompt/completion, alpaca, messages or text rows (a file, or the
    examples `prompt_examples` read from one)."""
    examples = prompt_examples(path) if isinstance(path, str) else path
    rows = []
    for example in examples:
        rows.append(_prompt_row(example, tokenizer, chat_template))
    return rows


def _prompt_row(example: Example, tokenizer, chat_template: str | None) -> PromptRow:
    if example.format == "text":
        return PromptRow(example.where, example.text)
    if example.format == "messages":
        turns = example.messages
        reference = None
        if turns[-1]["role"] == "assistant":
            turns, reference = turns[:-1], turns[-1]["content"]
        return PromptRow(example.where, prompt_text(turns, tokenizer, chat_template, example.where), reference)
    if example.format == "preference":
        raise DataError(f"{example.where}: preference rows hold no single prompt to generate from; use rows "
                        "with 'prompt' (and optionally 'completion')")
    return PromptRow(example.where, prompt_text(example.prompt, tokenizer, chat_template, example.where),
                     example.completion)


def resolve_model_dir(path: str) -> str:
    """A run directory stands for its final/ model, a checkpoint for its model/."""
    for inner in ("final", "model"):
        if (Path(path) / inner).is_dir():
            return str(Path(path) / inner)
    return path


def generate_rows(model_path: str, examples: list[Example], options: GenerationOptions) -> list[dict]:
    """A `{prompt, response}` row for every prompt of `examples` (as `prompt_examples` reads them), in order."""
    model, tokenizer = load_for_inference(resolve_model_dir(model_path))
    rows = prompt_rows(examples, tokenizer)
    responses = generate(model, tokenizer, [r.prompt for r in rows], **asdict(options))
    return [{"prompt": r.prompt, "response": text} for r, text in zip(rows, responses)]


def generate_file(model_path: str, prompts_path: str, output: str | None, options: GenerationOptions) -> int:
    """Generate a response for every prompt row; write JSONL {prompt, response} to `output` or stdout."""
    rows = generate_rows(model_path, prompt_examples(prompts_path), options)  # the prompts are read first
    write_output("".join(json.dumps(row) + "\n" for row in rows), output)
    return len(rows)


def chat_loop(model_path: str, options: GenerationOptions, system: str | None = None,
              stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """An interactive chat with the model's chat template, streaming each reply as it is generated.

    Commands: /reset starts a new conversation, /exit (or end of input) quits. Returns the number of turns.
    """
    from transformers import TextStreamer

    model, tokenizer = load_for_inference(resolve_model_dir(model_path))
    template = require_chat_template(tokenizer, None, model_path)

    class Stream(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stdout.write(terminal_safe(text) + ("\n" if stream_end else ""))
            stdout.flush()

    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    turns = 0
    stdout.write("chat with the model; /reset starts over, /exit quits\n")
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            history = history[:1] if system else []
            stdout.write("(new conversation)\n")
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        stdout.write("model> ")
        # beam search cannot stream: its best sequence is only known at the end
        streamer = Stream(tokenizer, skip_prompt=True, skip_special_tokens=True) if options.num_beams == 1 else None
        reply = generate(model, tokenizer, [render_chat(tokenizer, template, history, True)], streamer=streamer,
                         **{k: v for k, v in asdict(options).items() if k != "batch_size"})[0]
        if streamer is None:
            stdout.write(terminal_safe(reply) + "\n")
        history.append({"role": "assistant", "content": reply})
        turns += 1
    return turns

"""Row formats users bring from TRL and LLaMA-Factory: ShareGPT (with tool calls), TRL's conversational
prompt-completion and preference rows, tool turns and a tools column, OpenAI content parts, alpaca
system / history, alpaca and ShareGPT preference rows, H4 UltraFeedback rows, column mapping, unread
columns reported, and a separate held-out file. Each is loaded, its rendered text and trained tokens
checked, and trained for a couple of steps with the recipe that reads it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.helpers import make_tiny_model_dir, write_jsonl
from tunelab.cli import main
from tunelab.config import (ConfigError, DataConfig, DataSource, DPOConfig, KTOConfig, ModelConfig, PPOConfig,
                            RMConfig, SFTConfig, TrainConfig, build_config)
from tunelab.data.dataset import prepare_sft_data
from tunelab.data.feedback import prepare_feedback_data
from tunelab.data.load import DataError
from tunelab.data.preference import prepare_policy_pairs, prepare_preference_data
from tunelab.data.templates import CHATML_TEMPLATE, alpaca_prompt

WEATHER_TOOL = {"name": "get_weather", "description": "Current weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOLS_BLOCK = (
    "# Tools\n\nYou may call one or more functions to assist with the user query. The functions are:\n<tools>\n"
    + json.dumps({"type": "function", "function": WEATHER_TOOL})
    + "\n</tools>\n\nFor each call, return a JSON object with the function name and arguments within "
    "<tool_call></tool_call> tags.<|im_end|>\n")

# LLaMA-Factory's ShareGPT rows (glaive_toolcall style: function_call / observation, system and tools columns)
SHAREGPT_TOOL_ROW = {
    "conversations": [
        {"from": "human", "value": "What is the weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": json.dumps({"temperature": 21, "sky": "clear"})},
        {"from": "gpt", "value": "It is 21 degrees and clear in Paris."}],
    "system": "You are a weather assistant.",
    "tools": json.dumps([WEATHER_TOOL])}
SHAREGPT_ROW = {"conversations": [
    {"from": "human", "value": "Write a review of The Silent Harbor."},
    {"from": "gpt", "value": "A quiet triumph."},
    {"from": "human", "value": "Shorter?"},
    {"from": "gpt", "value": "Superb."}]}
# LLaMA-Factory's ShareGPT preference rows (dpo_en_demo.json)
SHAREGPT_PREFERENCE_ROW = {
    "conversations": [{"from": "human", "value": "Write a review of The Silent Harbor."}],
    "chosen": {"from": "gpt", "value": "A quiet triumph."},
    "rejected": {"from": "gpt", "value": "Dull."}}
# LLaMA-Factory's alpaca rows with system and history, and alpaca-style preference rows
ALPACA_HISTORY_ROW = {"instruction": "And in French?", "input": "", "output": "Bonjour.",
                      "system": "You are a translator.", "history": [["Say hello in Spanish.", "Hola."]]}
ALPACA_PREFERENCE_ROW = {"instruction": "Write a review of The Silent Harbor.", "input": "",
                         "chosen": "A quiet triumph.", "rejected": "Dull."}
# TRL's conversational rows
TRL_PROMPT_COMPLETION_ROW = {
    "prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What color is the sky?"}],
    "completion": [{"role": "assistant", "content": "It is blue."}]}
TRL_PREFERENCE_ROW = {"prompt": [{"role": "user", "content": "What color is the sky?"}],
                      "chosen": [{"role": "assistant", "content": "It is blue."}],
                      "rejected": [{"role": "assistant", "content": "It is green."}]}
TRL_KTO_ROWS = [{"prompt": [{"role": "user", "content": "What color is the sky?"}],
                 "completion": [{"role": "assistant", "content": answer}], "label": good}
                for answer, good in (("It is blue.", True), ("It is green.", False))]
TRL_TOOL_ROW = {
    "messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "name": "get_weather", "content": "21 degrees, clear"},
        {"role": "assistant", "content": "It is 21 degrees and clear."}],
    "tools": [{"type": "function", "function": WEATHER_TOOL}]}
CONTENT_PARTS_ROW = {"messages": [
    {"role": "user", "content": [{"type": "text", "text": "Summarize: "}, {"type": "text", "text": "The film was long."}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Too long."}]}]}
# HuggingFaceH4/ultrafeedback_binarized: a prompt string, chosen/rejected conversations that repeat it, and messages
ULTRAFEEDBACK_ROW = {
    "prompt": "Write a review of The Silent Harbor.", "prompt_id": "4f2a",
    "chosen": [{"content": "Write a review of The Silent Harbor.", "role": "user"},
               {"content": "A quiet triumph.", "role": "assistant"}],
    "rejected": [{"content": "Write a review of The Silent Harbor.", "role": "user"},
                 {"content": "Dull.", "role": "assistant"}],
    "messages": [{"content": "Write a review of The Silent Harbor.", "role": "user"},
                 {"content": "A quiet triumph.", "role": "assistant"}],
    "score_chosen": 8.0, "score_rejected": 5.0}


def user(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n"


def assistant(text: str) -> str:
    return f"<|im_start|>assistant\n{text}<|im_end|>\n"


def decoded(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def trained_runs(tokenizer, rendered) -> list[str]:
    """The decoded runs of trained tokens, in order."""
    runs, current = [], []
    for token, trained in zip(rendered.ids, rendered.mask):
        if trained:
            current.append(token)
        elif current:
            runs.append(decoded(tokenizer, current))
            current = []
    return runs + ([decoded(tokenizer, current)] if current else [])


def sources(*paths, **kwargs) -> DataConfig:
    kwargs.setdefault("eval_fraction", 0.0)
    return DataConfig(sources=[p if isinstance(p, DataSource) else DataSource(path=str(p)) for p in paths],
                      max_length=1024, **kwargs)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("formats") / "model")


def small_train(**overrides) -> TrainConfig:
    return TrainConfig(**{**dict(lr=1e-3, batch_size=4, max_steps=2, warmup_ratio=0.0, log_every=1, seed=0,
                                 report=False), **overrides})


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "split" not in json.loads(line) and "step" in json.loads(line)]


# ----------------------------------------------------------------------------- ShareGPT


def test_sharegpt_rows_with_tool_calls_system_and_tools(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "glaive.jsonl", [SHAREGPT_TOOL_ROW, SHAREGPT_ROW])
    data = prepare_sft_data(sources(path), tokenizer)
    assert data.sources[0].format == "sharegpt"
    assert data.sources[0].reading == "read as sharegpt: columns conversations, system, tools"
    tool_row, plain_row = data.train
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert decoded(tokenizer, tool_row.ids) == (
        "<|im_start|>system\nYou are a weather assistant.\n\n" + TOOLS_BLOCK + user("What is the weather in Paris?")
        + assistant(call) + '<|im_start|>tool\n{"temperature": 21, "sky": "clear"}<|im_end|>\n'
        + assistant("It is 21 degrees and clear in Paris."))
    # the function_call and gpt turns are trained (with their end-of-turn); system, tools, human and observation not
    assert trained_runs(tokenizer, tool_row) == [call + "<|im_end|>\n", "It is 21 degrees and clear in Paris.<|im_end|>\n"]
    assert decoded(tokenizer, plain_row.ids) == (user("Write a review of The Silent Harbor.")
                                                 + assistant("A quiet triumph.") + user("Shorter?") + assistant("Superb."))
    assert trained_runs(tokenizer, plain_row) == ["A quiet triumph.<|im_end|>\n", "Superb.<|im_end|>\n"]


@pytest.mark.parametrize("turn,message", [
    ({"from": "bot", "value": "hi"}, "field 'conversations' item 1 has from 'bot'; expected one of ('human', "),
    ({"from": "function_call", "value": "get_weather(Paris)"},
     "field 'conversations' item 1 (function_call) must hold a JSON tool call"),
    ({"from": "function_call", "value": '{"arguments": {}}'},
     "field 'conversations' item 1 must be a tool call with a 'name' and 'arguments'"),
])
def test_bad_sharegpt_turns_name_file_line_and_field(tmp_path, tokenizer, turn, message):
    row = {"conversations": [{"from": "human", "value": "Weather?"}, turn]}
    path = write_jsonl(tmp_path / "bad.jsonl", [SHAREGPT_ROW, row])
    with pytest.raises(DataError) as info:
        prepare_sft_data(sources(path), tokenizer)
    assert str(info.value).startswith(f"{path} line 2: {message}")


def test_bad_tools_column_names_file_line_and_field(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "tools.jsonl", [{**SHAREGPT_TOOL_ROW, "tools": "[{name: get_weather}]"}])
    with pytest.raises(DataError, match=rf"^{path} line 1: field 'tools' must be a list of tool definitions"):
        prepare_sft_data(sources(path), tokenizer)


def test_a_template_that_drops_tool_calls_or_tools_is_an_error(tmp_path, tokenizer):
    plain = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
             "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    path = write_jsonl(tmp_path / "calls.jsonl", [{"conversations": SHAREGPT_TOOL_ROW["conversations"]}])
    with pytest.raises(DataError, match=rf"^{path} line 1: the chat template does not write tool calls \(the call "
                                        r"of 'get_weather' is missing"):
        prepare_sft_data(sources(path, chat_template=plain), tokenizer)
    tools = write_jsonl(tmp_path / "tools.jsonl", [{**SHAREGPT_ROW, "tools": [WEATHER_TOOL]}])
    with pytest.raises(DataError, match=rf"^{tools} line 1: the chat template does not write the 'tools' column"):
        prepare_sft_data(sources(tools, chat_template=plain), tokenizer)


# ----------------------------------------------------------------------------- TRL conversational rows, tools, parts


def test_trl_conversational_prompt_completion_trains_on_the_completion_only(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pc.jsonl", [TRL_PROMPT_COMPLETION_ROW])
    data = prepare_sft_data(sources(path), tokenizer)
    assert data.sources[0].format == "prompt_completion"
    row = data.train[0]
    assert decoded(tokenizer, row.ids) == ("<|im_start|>system\nAnswer briefly.<|im_end|>\n"
                                           + user("What color is the sky?") + assistant("It is blue."))
    assert trained_runs(tokenizer, row) == ["It is blue.<|im_end|>\n"]


def test_trl_tool_calling_rows_pass_tools_to_the_template(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "tools.jsonl", [TRL_TOOL_ROW])
    row = prepare_sft_data(sources(path), tokenizer).train[0]
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert decoded(tokenizer, row.ids) == (
        "<|im_start|>system\n" + TOOLS_BLOCK + user("What is the weather in Paris?") + assistant(call)
        + "<|im_start|>tool\n21 degrees, clear<|im_end|>\n" + assistant("It is 21 degrees and clear."))
    assert trained_runs(tokenizer, row) == [call + "<|im_end|>\n", "It is 21 degrees and clear.<|im_end|>\n"]


def test_openai_content_parts_are_joined_and_other_parts_are_errors(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "parts.jsonl", [CONTENT_PARTS_ROW])
    row = prepare_sft_data(sources(path), tokenizer).train[0]
    assert decoded(tokenizer, row.ids) == user("Summarize: The film was long.") + assistant("Too long.")
    assert trained_runs(tokenizer, row) == ["Too long.<|im_end|>\n"]

    image = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in the picture?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]},
        {"role": "assistant", "content": "A cat."}]}
    bad = write_jsonl(tmp_path / "image.jsonl", [CONTENT_PARTS_ROW, image])
    with pytest.raises(DataError) as info:
        prepare_sft_data(sources(bad), tokenizer)
    assert str(info.value) == (f"{bad} line 2: field 'messages' item 0 content part 1 has type 'image_url'; only "
                               "text parts ({\"type\": \"text\", \"text\": ...}) can be trained on")


# ----------------------------------------------------------------------------- alpaca read whole


def test_alpaca_system_and_history_are_the_prompt_and_only_the_output_is_trained(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [ALPACA_HISTORY_ROW])
    row = prepare_sft_data(sources(path), tokenizer).train[0]
    prompt = ("You are a translator.\n\n### Instruction:\nSay hello in Spanish.\n\n### Response:\nHola.\n\n"
              "### Instruction:\nAnd in French?\n\n### Response:\n")
    assert alpaca_prompt("And in French?", system="You are a translator.",
                         history=[("Say hello in Spanish.", "Hola.")]) == prompt
    assert decoded(tokenizer, row.ids) == "<s>" + prompt + "Bonjour.</s>"
    assert trained_runs(tokenizer, row) == ["Bonjour.</s>"]

    bad = write_jsonl(tmp_path / "bad.jsonl", [ALPACA_HISTORY_ROW, {**ALPACA_HISTORY_ROW, "history": [["Hi."]]}])
    with pytest.raises(DataError, match=rf"^{bad} line 2: field 'history' item 0 must be an \[instruction, response\] "
                                        "pair of strings"):
        prepare_sft_data(sources(bad), tokenizer)


def test_alpaca_preference_rows_score_the_instruction_as_the_prompt(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "alpaca_pref.jsonl", [ALPACA_PREFERENCE_ROW])
    prompt = alpaca_prompt("Write a review of The Silent Harbor.")
    pair = prepare_preference_data(sources(path), tokenizer).train[0]
    # a reward model reads prompt + response as plain transformers tokenizes it (no EOS added); the policy's
    # DPO sequences end with the EOS it learns to emit
    assert decoded(tokenizer, pair.chosen) == "<s>" + prompt + "A quiet triumph."
    assert decoded(tokenizer, pair.rejected) == "<s>" + prompt + "Dull."
    policy = prepare_policy_pairs(sources(path), tokenizer).train[0]
    assert decoded(tokenizer, policy.chosen.ids) == "<s>" + prompt + "A quiet triumph.</s>"
    assert trained_runs(tokenizer, policy.chosen) == ["A quiet triumph.</s>"]
    assert trained_runs(tokenizer, policy.rejected) == ["Dull.</s>"]


# ----------------------------------------------------------------------------- preference rows, no turn twice


@pytest.mark.parametrize("row,fmt", [(SHAREGPT_PREFERENCE_ROW, "preference"), (ULTRAFEEDBACK_ROW, "preference"),
                                     ({**ULTRAFEEDBACK_ROW, "prompt": ULTRAFEEDBACK_ROW["chosen"][:1]}, "preference")])
def test_conversational_preference_rows_render_the_prompt_turn_once(tmp_path, tokenizer, row, fmt):
    path = write_jsonl(tmp_path / "pref.jsonl", [row])
    data = prepare_preference_data(sources(path), tokenizer)
    assert data.sources[0].format == fmt
    prompt = user("Write a review of The Silent Harbor.")
    pair = data.train[0]
    assert decoded(tokenizer, pair.chosen) == prompt + assistant("A quiet triumph.")
    assert decoded(tokenizer, pair.rejected) == prompt + assistant("Dull.")
    policy = prepare_policy_pairs(sources(path), tokenizer).train[0]
    assert decoded(tokenizer, policy.chosen.ids) == prompt + assistant("A quiet triumph.")
    assert trained_runs(tokenizer, policy.chosen) == ["A quiet triumph.<|im_end|>\n"]
    assert trained_runs(tokenizer, policy.rejected) == ["Dull.<|im_end|>\n"]


def test_trl_conversational_preference_rows(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pref.jsonl", [TRL_PREFERENCE_ROW])
    pair = prepare_preference_data(sources(path), tokenizer).train[0]
    assert decoded(tokenizer, pair.chosen) == user("What color is the sky?") + assistant("It is blue.")
    policy = prepare_policy_pairs(sources(path), tokenizer).train[0]
    assert trained_runs(tokenizer, policy.rejected) == ["It is green.<|im_end|>\n"]


def test_ultrafeedback_rows_are_preference_rows_for_rm_and_messages_for_sft_with_the_rest_reported(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "ultrafeedback.jsonl", [ULTRAFEEDBACK_ROW] * 3)
    rm = prepare_preference_data(sources(path), tokenizer)
    assert rm.sources[0].format == "preference"
    assert rm.summary_lines()[1:] == [
        f"warning: {path}: column(s) 'messages' are not read by the 'preference' format and are ignored (map them "
        "with data.columns or set the source's format)"]  # one warning for the source, not one per row
    sft = prepare_sft_data(sources(path), tokenizer)
    assert sft.sources[0].format == "messages"
    assert sft.sources[0].warnings == [
        f"{path}: column(s) 'chosen', 'prompt', 'rejected' are not read by the 'messages' format and are ignored "
        "(map them with data.columns or set the source's format)"]


def test_preference_sides_that_do_not_continue_the_prompt_are_errors(tmp_path, tokenizer):
    row = {"prompt": [{"role": "user", "content": "A"}],
           "chosen": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "x"}],
           "rejected": [{"role": "assistant", "content": "y"}]}
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError, match=rf"^{path} line 1: field 'chosen' must continue the 'prompt' with an "
                                        "assistant message"):
        prepare_preference_data(sources(path), tokenizer)
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{**SHAREGPT_PREFERENCE_ROW, "chosen": {"from": "human", "value": "x"}}])
    with pytest.raises(DataError, match=rf"^{wrong} line 1: field 'chosen' is a user message; expected an assistant"):
        prepare_preference_data(sources(wrong), tokenizer)


# ----------------------------------------------------------------------------- column mapping


def test_column_mapping_global_per_source_and_in_yaml(tmp_path, tokenizer):
    path = tmp_path / "qa.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["question", "answer", "reply"])
        writer.writeheader()
        writer.writerow({"question": "Capital of France?", "answer": " Paris.", "reply": " Lyon."})
    data = prepare_sft_data(sources(path, columns={"prompt": "question", "completion": "answer"}), tokenizer)
    assert data.sources[0].format == "prompt_completion"
    assert trained_runs(tokenizer, data.train[0]) == [" Paris.</s>"]
    assert data.sources[0].reading == ("read as prompt_completion: columns answer, question; mapped question -> "
                                       "prompt, answer -> completion")
    # a source's own mapping wins over data.columns
    own = DataSource(path=str(path), columns={"completion": "reply"})
    data = prepare_sft_data(sources(own, columns={"prompt": "question", "completion": "answer"}), tokenizer)
    assert trained_runs(tokenizer, data.train[0]) == [" Lyon.</s>"]

    yaml_path = tmp_path / "config.yaml"
    yaml_path.write_text(f"data:\n  columns: {{prompt: question}}\n  sources:\n    - path: {path}\n"
                         "      columns: {completion: answer}\n")
    config = build_config(SFTConfig, yaml_path=str(yaml_path))
    assert (config.data.columns, config.data.sources[0].columns) == ({"prompt": "question"}, {"completion": "answer"})
    config = build_config(SFTConfig, overrides=[f"data.sources=[{{path: {path}}}]", "data.columns.prompt=question",
                                                "data.sources.0.columns.completion=reply"])
    data = prepare_sft_data(config.data.model_copy(update={"eval_fraction": 0.0}), tokenizer)
    assert trained_runs(tokenizer, data.train[0]) == [" Lyon.</s>"]


def test_column_mapping_errors_name_the_column(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": "A."}])
    with pytest.raises(DataError) as info:
        prepare_sft_data(sources(path, columns={"prompt": "query", "completion": "answer"}), tokenizer)
    assert str(info.value) == (f"{path}: column 'query' (mapped to 'prompt' by data.columns) is not in the data; "
                               "its columns are ['answer', 'question']")
    with pytest.raises(ConfigError, match=r"config value 'data.columns' .*'promt' is not a column name tunelab reads "
                                          r"\(did you mean 'prompt'\?\)"):
        build_config(SFTConfig, overrides=["data.columns.promt=question"])


def test_known_columns_that_are_not_read_are_a_warning_once_per_source(tmp_path, tokenizer):
    rows = [{"instruction": f"Say {w}.", "output": w, "text": f"Say {w}. {w}", "images": []} for w in ("hi", "yo")]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    data = prepare_sft_data(sources(path), tokenizer)
    assert data.summary_lines()[1:] == [
        f"warning: {path}: column(s) 'images', 'text' are not read by the 'alpaca' format and are ignored (map them "
        "with data.columns or set the source's format)"]
    # a system column beside text prompts has nowhere to go: reported too
    plain = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q", "completion": "A", "system": "Be brief."}])
    assert prepare_sft_data(sources(plain), tokenizer).sources[0].warnings[0].startswith(
        f"{plain}: column(s) 'system' are not read")


# ----------------------------------------------------------------------------- held-out file, inspect


def test_eval_sources_are_the_held_out_rows(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [SHAREGPT_ROW] * 10)
    held = write_jsonl(tmp_path / "valid.jsonl", [TRL_PROMPT_COMPLETION_ROW] * 3)
    config = DataConfig(sources=[DataSource(path=str(train))], eval_sources=[DataSource(path=str(held))],
                        eval_fraction=0.5)
    data = prepare_sft_data(config, tokenizer)
    assert (len(data.train), len(data.held_out)) == (10, 3)  # eval_fraction is not used: nothing carved out
    assert trained_runs(tokenizer, data.held_out[0]) == ["It is blue.<|im_end|>\n"]
    assert data.summary_lines()[1] == f"{held} [prompt_completion]: 3 rows, 3 kept (0 truncated), 0 dropped as too " \
                                      "long, 0 dropped as empty; 3 held out (eval data)"
    args = ["rm", "--data", str(train), "--eval-data", str(held), "--eval-data", "b.jsonl"]
    from tunelab.cli import _recipe_config, build_parser

    parsed = _recipe_config(RMConfig, build_parser().parse_args(args))
    assert [s.path for s in parsed.data.eval_sources] == [str(held), "b.jsonl"]


def test_inspect_shows_how_each_source_was_read(tmp_path, tokenizer_dir, capsys):
    path = write_jsonl(tmp_path / "glaive.jsonl", [SHAREGPT_TOOL_ROW])
    extra = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": "A.", "text": "Q? A."}])
    assert main(["inspect", "--model", str(tokenizer_dir), "--data", str(path), "--data", str(extra), "--n", "0",
                 "data.sources.1.columns.prompt=question", "data.sources.1.columns.completion=answer",
                 "data.eval_fraction=0"]) == 0
    out = capsys.readouterr().out
    assert "  read as sharegpt: columns conversations, system, tools\n" in out
    assert ("  read as prompt_completion: columns answer, question; mapped question -> prompt, answer -> completion; "
            "not read: text\n") in out
    assert f"  warning: {extra}: column(s) 'text' are not read by the 'prompt_completion' format" in out


# ----------------------------------------------------------------------------- training on each format


def test_sft_trains_on_sharegpt_trl_tool_parts_and_alpaca_rows(tiny_dir, tmp_path):
    from tunelab.recipes.sft import run_sft

    files = [write_jsonl(tmp_path / f"{name}.jsonl", rows) for name, rows in (
        ("sharegpt", [SHAREGPT_TOOL_ROW, SHAREGPT_ROW] * 2), ("trl", [TRL_PROMPT_COMPLETION_ROW] * 2),
        ("trl_tools", [TRL_TOOL_ROW] * 2),
        ("parts", [CONTENT_PARTS_ROW] * 2), ("alpaca", [ALPACA_HISTORY_ROW] * 2))]
    held = write_jsonl(tmp_path / "held.jsonl", [SHAREGPT_ROW, SHAREGPT_TOOL_ROW])
    config = SFTConfig(model=ModelConfig(name_or_path=str(tiny_dir)), output=str(tmp_path / "run"),
                       data=DataConfig(sources=[DataSource(path=str(f)) for f in files], max_length=512,
                                       eval_sources=[DataSource(path=str(held))]), train=small_train())
    result = run_sft(config, quiet=True)
    assert [s.format for s in result.data.sources] == ["sharegpt", "prompt_completion", "messages", "messages", "alpaca",
                                                      "sharegpt"]
    assert result.train.steps == 2 and steps_logged(result.run_dir) == [1, 2]
    assert result.train.eval_metrics["loss"] > 0  # evaluated on the held-out file


@pytest.mark.parametrize("recipe", ["rm", "dpo"])
def test_rm_and_dpo_train_on_sharegpt_alpaca_ultrafeedback_and_trl_preference_rows(tiny_dir, tmp_path, recipe):
    files = [write_jsonl(tmp_path / f"{name}.jsonl", [row] * 4) for name, row in (
        ("sharegpt", SHAREGPT_PREFERENCE_ROW), ("alpaca", ALPACA_PREFERENCE_ROW), ("uf", ULTRAFEEDBACK_ROW),
        ("trl", TRL_PREFERENCE_ROW))]
    data = DataConfig(sources=[DataSource(path=str(f)) for f in files], max_length=256,
                      eval_sources=[DataSource(path=str(files[0]))])
    model = ModelConfig(name_or_path=str(tiny_dir))
    if recipe == "rm":
        from tunelab.recipes.reward import run_rm

        result = run_rm(RMConfig(model=model, output=str(tmp_path / "run"), data=data, train=small_train()), quiet=True)
    else:
        from tunelab.recipes.dpo import run_dpo

        result = run_dpo(DPOConfig(model=model, output=str(tmp_path / "run"), data=data, train=small_train()),
                         quiet=True)
    assert result.train.steps == 2 and steps_logged(result.run_dir) == [1, 2]
    # evaluated on the held-out file: its 4 identical pairs are all ranked one way
    accuracy = result.train.eval_metrics["accuracy" if recipe == "rm" else "reward_accuracy"]
    assert accuracy in (0.0, 0.5, 1.0)


def test_kto_trains_on_trl_conversational_feedback_and_ultrafeedback_pairs(tiny_dir, tmp_path, tokenizer):
    from tunelab.recipes.kto import run_kto

    feedback = write_jsonl(tmp_path / "kto.jsonl", TRL_KTO_ROWS * 3)
    pairs = write_jsonl(tmp_path / "uf.jsonl", [ULTRAFEEDBACK_ROW] * 3)
    data = prepare_feedback_data(sources(feedback, pairs), tokenizer)
    assert [s.format for s in data.sources] == ["prompt_completion", "preference pairs, 2 rows each"]
    first = data.train[0].rows[0]
    assert decoded(tokenizer, first.rendered.ids) == user("What color is the sky?") + assistant("It is blue.")
    assert trained_runs(tokenizer, first.rendered) == ["It is blue.<|im_end|>\n"]
    config = KTOConfig(model=ModelConfig(name_or_path=str(tiny_dir)), output=str(tmp_path / "run"),
                       data=DataConfig(sources=[DataSource(path=str(feedback)), DataSource(path=str(pairs))],
                                       max_length=256, eval_fraction=0.0), train=small_train())
    result = run_kto(config, quiet=True)
    assert result.train.steps == 2 and steps_logged(result.run_dir) == [1, 2]


# LLaMA-Factory's KTO rows: ShareGPT with a kto_tag (its data README), and kto_en_demo.json (messages + label)
LLAMA_FACTORY_KTO_ROWS = [
    {"conversations": [{"from": "human", "value": "Write a review of The Silent Harbor."},
                       {"from": "gpt", "value": "A quiet triumph."},
                       {"from": "human", "value": "Shorter?"},
                       {"from": "gpt", "value": "Superb."}],
     "system": "You are a film critic.", "kto_tag": True},
    {"conversations": [{"from": "human", "value": "Write a review of The Silent Harbor."},
                       {"from": "gpt", "value": "Dull."}], "kto_tag": False}]
KTO_DEMO_ROW = {"messages": [{"content": "What color is the sky?", "role": "user"},
                             {"content": "It is green.", "role": "assistant"}], "label": False}


def test_llama_factory_kto_rows_train_kto_on_the_last_assistant_turn(tiny_dir, tmp_path, tokenizer):
    sharegpt = write_jsonl(tmp_path / "kto_sharegpt.jsonl", LLAMA_FACTORY_KTO_ROWS * 2)
    demo = write_jsonl(tmp_path / "kto_en_demo.jsonl", [KTO_DEMO_ROW] * 2)
    data = prepare_feedback_data(sources(sharegpt, demo), tokenizer)
    assert [s.format for s in data.sources] == ["kto", "kto"]
    assert "kto_tag" in data.sources[0].reading and not data.sources[0].warnings
    first, second, third = (item.rows[0] for item in data.train[:2] + data.train[4:5])
    assert decoded(tokenizer, first.rendered.ids) == (
        "<|im_start|>system\nYou are a film critic.<|im_end|>\n" + user("Write a review of The Silent Harbor.")
        + assistant("A quiet triumph.") + user("Shorter?") + assistant("Superb."))
    assert trained_runs(tokenizer, first.rendered) == ["Superb.<|im_end|>\n"]  # earlier turns are the prompt
    assert [first.desirable, second.desirable, third.desirable] == [True, False, False]
    assert trained_runs(tokenizer, second.rendered) == ["Dull.<|im_end|>\n"]
    assert decoded(tokenizer, third.rendered.ids) == user("What color is the sky?") + assistant("It is green.")
    run = tmp_path / "run"  # `tunelab kto` on the two files
    assert main(["kto", "--model", str(tiny_dir), "--data", str(sharegpt), "--data", str(demo), "--output", str(run),
                 "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3", "--quiet", "data.max_length=256",
                 "data.eval_fraction=0", "train.warmup_ratio=0", "train.log_every=1", "train.report=false"]) == 0
    assert steps_logged(run) == [1, 2] and (run / "final").is_dir()


def test_llama_factory_kto_rows_are_still_sharegpt_for_sft_and_bad_tags_are_errors(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "kto.jsonl", LLAMA_FACTORY_KTO_ROWS)
    data = prepare_sft_data(sources(path), tokenizer)
    assert data.sources[0].format == "sharegpt"
    assert "'kto_tag'" in data.sources[0].warnings[0]  # not read by sft: said, not silent
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**LLAMA_FACTORY_KTO_ROWS[1], "kto_tag": "maybe"}])
    with pytest.raises(DataError, match=r"bad.jsonl line 1: field 'kto_tag' must be a boolean"):
        prepare_feedback_data(sources(bad), tokenizer)
    ends_on_user = write_jsonl(tmp_path / "user.jsonl", [{"conversations": [{"from": "human", "value": "Hi"}],
                                                          "kto_tag": True}])
    with pytest.raises(DataError, match=r"user.jsonl line 1: field 'conversations' of a KTO row must end with the "
                                        "assistant turn"):
        prepare_feedback_data(sources(ends_on_user), tokenizer)


def test_ppo_reads_prompts_from_trl_and_sharegpt_rows(tiny_dir, tmp_path, tokenizer):
    from tunelab.recipes.online import prepare_prompts
    from tunelab.recipes.ppo import run_ppo

    trl = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": TRL_PREFERENCE_ROW["prompt"]}] * 4)
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [SHAREGPT_PREFERENCE_ROW] * 4)
    config = PPOConfig(model=ModelConfig(name_or_path=str(tiny_dir)), output=str(tmp_path / "run"), peft="none",
                       data=DataConfig(sources=[DataSource(path=str(trl)), DataSource(path=str(sharegpt))],
                                       eval_fraction=0.0), train=small_train(batch_size=4, max_steps=1))
    config.reward.source = "tests.recipes.test_ppo:letter_a_reward"
    config.generation.max_new_tokens = 4
    config.ppo.minibatch_size = 4
    config.ppo.sample_every = 0
    prompts = prepare_prompts(config, tokenizer).train
    assert prompts[0] == user("What color is the sky?") + "<|im_start|>assistant\n"
    assert prompts[-1] == user("Write a review of The Silent Harbor.") + "<|im_start|>assistant\n"
    result = run_ppo(config, quiet=True)
    assert result.iterations == 1 and len(result.history) == 1


def test_chatml_template_renders_plain_conversations_as_before(tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"}]
    text = tokenizer.apply_chat_template(messages, chat_template=CHATML_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n" + user("U") + assistant("A") + "<|im_start|>assistant\n"


def test_generate_reads_prompts_and_references_from_trl_and_sharegpt_rows(tmp_path, tokenizer):
    from tunelab.generation import prompt_rows

    trl = write_jsonl(tmp_path / "pc.jsonl", [TRL_PROMPT_COMPLETION_ROW])
    row = prompt_rows(str(trl), tokenizer)[0]
    assert row.prompt == ("<|im_start|>system\nAnswer briefly.<|im_end|>\n" + user("What color is the sky?")
                          + "<|im_start|>assistant\n")
    assert row.reference == "It is blue."
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [SHAREGPT_ROW])
    row = prompt_rows(str(sharegpt), tokenizer)[0]
    assert row.reference == "Superb."
    assert row.prompt.endswith(user("Shorter?") + "<|im_start|>assistant\n")


def test_contrastive_pairs_take_their_held_out_rows_from_eval_data(tmp_path, tokenizer):
    from tunelab.data.pairs import prepare_pair_data

    train = write_jsonl(tmp_path / "pairs.jsonl", [{"anchor": f"query {i}", "positive": f"doc {i}"} for i in range(8)])
    held = write_jsonl(tmp_path / "held.jsonl", [{"query": "capital of France", "document": "Paris"}] * 2)
    data = prepare_pair_data(DataConfig(sources=[DataSource(path=str(train))], eval_sources=[DataSource(path=str(held))],
                                        eval_fraction=0.5), tokenizer)
    assert (len(data.train), len(data.held_out)) == (8, 2)
    assert decoded(tokenizer, data.held_out[0].positive) == "<s>Paris</s>"


@pytest.mark.parametrize("columns,prefer,expected", [
    ({"prompt", "chosen", "rejected", "messages", "prompt_id"}, None, "messages"),
    ({"prompt", "chosen", "rejected", "messages", "prompt_id"}, ("preference",), "preference"),
    ({"prompt", "chosen", "rejected", "messages"}, ("text", "prompt_completion", "alpaca", "messages"), "messages"),
    ({"prompt", "chosen", "rejected", "messages"}, ("prompt_completion", "preference"), "preference"),
    ({"conversations", "system", "tools"}, None, "sharegpt"),
    ({"conversations", "chosen", "rejected"}, None, "preference"),
    ({"conversations", "chosen", "rejected"}, ("text", "prompt_completion", "alpaca", "messages"), "sharegpt"),
    ({"instruction", "input", "chosen", "rejected"}, ("preference",), "preference"),
    ({"prompt", "completion", "text"}, ("text", "prompt_completion"), "prompt_completion"),
    ({"conversations", "system", "kto_tag"}, None, "sharegpt"),
    ({"conversations", "kto_tag"}, ("prompt_completion", "preference"), "kto"),
    ({"messages", "label"}, ("prompt_completion", "preference"), "kto"),
    ({"messages", "label"}, ("text", "prompt_completion", "alpaca", "messages"), "messages"),
    ({"prompt"}, ("preference",), "prompt"),  # nothing of the preferred kind: the recipe names what it needs
])
def test_detection_prefers_the_recipes_kind(columns, prefer, expected):
    from tunelab.data.formats import detect_format

    assert detect_format(columns, "data.jsonl", prefer) == expected


# ----------------------------------------------------------------------------- batched rendering


def test_batched_rendering_equals_row_by_row_rendering(tmp_path, tokenizer, monkeypatch):
    """Chat templates rendered in one apply_chat_template call per chunk and pieces tokenized in one call
    give the ids and masks of rendering and tokenizing each row alone."""
    from tunelab.data import templates

    rows = [SHAREGPT_TOOL_ROW, SHAREGPT_ROW, TRL_TOOL_ROW, CONTENT_PARTS_ROW, TRL_PROMPT_COMPLETION_ROW,
            ALPACA_HISTORY_ROW, {"text": "Plain domain text."},
            {"messages": [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "Ok."},
                          {"role": "assistant", "content": "Good."}]}]
    files = [write_jsonl(tmp_path / f"{i}.jsonl", [row] * 3) for i, row in enumerate(rows)]
    batched = prepare_sft_data(sources(*files), tokenizer)

    def one_at_a_time(tok, requests):  # each conversation rendered alone, as `render_chat` renders it
        return [templates.render_chat(tok, template, messages, generation, tools, where) if messages
                else templates._generation_only(tok, template, tools)
                for template, messages, generation, tools, where in requests]

    calls = []
    real = tokenizer.apply_chat_template
    monkeypatch.setattr(tokenizer, "apply_chat_template", lambda *a, **k: calls.append(a) or real(*a, **k))
    prepare_sft_data(sources(files[1]), tokenizer)
    assert len(calls) == 2  # one call for all 3 rows per kind of render: before and after each reply
    monkeypatch.setattr(templates, "render_chats", one_at_a_time)
    row_by_row = prepare_sft_data(sources(*files), tokenizer)
    as_lists = [(r.ids, r.mask, r.where) for r in batched.train]
    assert as_lists == [(r.ids, r.mask, r.where) for r in row_by_row.train] and len(as_lists) == 24


def test_a_templates_own_error_on_one_row_of_a_batch_is_raised(tmp_path, tokenizer):
    template = CHATML_TEMPLATE.replace("{% for message in messages %}", "{% for message in messages %}{% if "
                                       "message['content'] == 'refuse me' %}{{ raise_exception('refused row') }}"
                                       "{% endif %}", 1)
    assert template != CHATML_TEMPLATE
    rows = [{"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]},
            {"messages": [{"role": "user", "content": "refuse me"}, {"role": "assistant", "content": "No."}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", [rows[0], rows[0], rows[1]])
    with pytest.raises(Exception, match="refused row"):
        prepare_sft_data(sources(path, chat_template=template), tokenizer)
    fine = write_jsonl(tmp_path / "fine.jsonl", [rows[0]] * 2)
    assert len(prepare_sft_data(sources(fine, chat_template=template), tokenizer).train) == 2

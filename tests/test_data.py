"""Tests for the data pipeline: loading, format detection, validation messages, exact loss masks,
the max_length policy, held-out split, mixtures, batching, padding and the inspect report/CLI."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from tunelab.cli import main
from tunelab.config import DataConfig, DataSource
from tunelab.data.batching import batches_per_epoch, epoch_batches, mixture_indices, pad_batch
from tunelab.data.dataset import prepare_sft_data, split_held_out
from tunelab.data.formats import Example, detect_format, to_example, to_examples
from tunelab.data.inspect import GREEN, RESET, data_stats, highlight, inspect_report, percentile
from tunelab.data.load import DataError, Row, load_rows
from tunelab.data.templates import (
    CHATML_TEMPLATE,
    Rendered,
    alpaca_prompt,
    fit_length,
    has_content,
    prompt_text,
    render_example,
)
from tunelab.demo.world import build_tokenizer, make_reviews

IM_END_NL = "<|im_end|>\n"


# ----------------------------------------------------------------------------- helpers


def tok(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict], fieldnames: list[str]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    return path


def config_for(*paths, **kwargs) -> DataConfig:
    kwargs.setdefault("eval_fraction", 0.0)
    sources = [p if isinstance(p, DataSource) else DataSource(path=str(p)) for p in paths]
    return DataConfig(sources=sources, **kwargs)


def spans(rendered: Rendered, tokenizer) -> list[tuple[int, str]]:
    """Contiguous runs of equal mask values, decoded: [(mask value, text), ...]."""
    out, start = [], 0
    for end in range(1, len(rendered.ids) + 1):
        if end == len(rendered.ids) or rendered.mask[end] != rendered.mask[start]:
            out.append((rendered.mask[start],
                        tokenizer.decode(rendered.ids[start:end], skip_special_tokens=False)))
            start = end
    return out


def example(row: dict, fmt: str = "auto", where: str = "src line 1") -> Example:
    return to_examples([Row(where, row)], fmt, "src")[1][0]


@pytest.fixture(scope="module")
def bare_tokenizer():
    """A second, small tokenizer that tests may change (e.g. remove its chat template)."""
    tk = build_tokenizer([r["text"] for r in make_reviews(50, seed=1)], vocab_size=400)
    tk.chat_template = None
    return tk


# ----------------------------------------------------------------------------- format detection


@pytest.mark.parametrize("columns,expected", [
    ({"text"}, "text"),
    ({"text", "title", "sentiment"}, "text"),
    ({"prompt", "completion"}, "prompt_completion"),
    ({"prompt", "completion", "text"}, "prompt_completion"),
    ({"instruction", "output"}, "alpaca"),
    ({"instruction", "input", "output"}, "alpaca"),
    ({"messages"}, "messages"),
    ({"messages", "text", "prompt", "completion"}, "messages"),
    ({"chosen", "rejected"}, "preference"),
    ({"prompt", "chosen", "rejected", "margin"}, "preference"),
    ({"prompt"}, "prompt"),
    ({"prompt", "id"}, "prompt"),
])
def test_detect_format_from_columns(columns, expected):
    assert detect_format(columns, "data.jsonl") == expected


def test_detect_format_unknown_columns_lists_columns_and_formats():
    with pytest.raises(DataError) as info:
        detect_format({"title", "body"}, "reviews.jsonl")
    msg = str(info.value)
    assert msg.startswith("reviews.jsonl: cannot tell the data format from the columns ['body', 'title']")
    for part in ("'text'", "'prompt'+'completion'", "'instruction'+'output' (alpaca)", "'messages'",
                 "'chosen'+'rejected'", "set the source's format explicitly"):
        assert part in msg


def test_detection_needs_both_columns_of_a_pair():
    # 'instruction' without 'output' and 'chosen' without 'rejected' are not enough
    with pytest.raises(DataError, match=r"columns \['chosen', 'instruction'\]"):
        detect_format({"instruction", "chosen"}, "x.csv")


def test_to_examples_detects_from_union_of_columns_of_first_rows():
    rows = [Row("a line 1", {"instruction": "Say hi.", "output": "Hi."}),
            Row("a line 2", {"instruction": "Add.", "input": "2+2", "output": "4"})]
    fmt, examples = to_examples(rows, "auto", "a")
    assert fmt == "alpaca"
    assert [e.prompt for e in examples] == [alpaca_prompt("Say hi."), alpaca_prompt("Add.", "2+2")]
    assert [e.completion for e in examples] == ["Hi.", "4"]
    assert [e.where for e in examples] == ["a line 1", "a line 2"]


def test_unknown_format_name_in_to_examples():
    rows = [Row("a line 1", {"text": "hello"})]
    with pytest.raises(DataError) as info:
        to_examples(rows, "xml", "a.jsonl")
    assert str(info.value) == ("a.jsonl: unknown data format 'xml'; expected one of text, prompt_completion, "
                               "alpaca, messages, sharegpt, kto, preference, prompt or auto")
    with pytest.raises(DataError, match="unknown data format 'chat'; expected one of text, "):
        to_example(rows[0], "chat")


def test_explicit_format_overrides_detection(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"text": "The film was wonderful.", "prompt": "Review:", "completion": " Dull."}])
    auto = prepare_sft_data(config_for(path), tokenizer)
    assert auto.sources[0].format == "prompt_completion"
    assert auto.train[0].ids == [tokenizer.bos_token_id] + tok(tokenizer, "Review:") + tok(tokenizer, " Dull.") + [
        tokenizer.eos_token_id]

    forced = prepare_sft_data(config_for(DataSource(path=str(path), format="text")), tokenizer)
    assert forced.sources[0].format == "text"
    assert forced.train[0].ids == [tokenizer.bos_token_id] + tok(tokenizer, "The film was wonderful.") + [
        tokenizer.eos_token_id]
    assert forced.summary_lines()[0].startswith(f"{path} [text]: 1 rows, 1 kept")


def test_explicit_format_reports_its_missing_field(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q", "completion": "A"}])
    with pytest.raises(DataError, match=rf"^{path} line 1: missing field 'text'$"):
        prepare_sft_data(config_for(DataSource(path=str(path), format="text")), tokenizer)


# ----------------------------------------------------------------------------- bad input messages


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n')  # line 2 blank, line 3 broken
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path} line 3: malformed JSON (")
    assert "at column" in msg


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "a"}\n["text", "b"]\n')
    with pytest.raises(DataError, match=rf"^{path} line 2: expected a JSON object with named fields, got list$"):
        load_rows(str(path))


@pytest.mark.parametrize("content,type_name", [
    ('{"prompt": "a", "completion": "b"}', "dict"),
    ('"just a string"', "str"),
    ("42", "int"),
])
def test_json_that_is_not_an_array(tmp_path, content, type_name):
    path = tmp_path / "obj.json"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    assert str(info.value) == f"{path}: expected a JSON array of objects (or use .jsonl), got {type_name}"


def test_json_single_messages_object_is_reported_as_not_an_array(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}))
    with pytest.raises(DataError, match="expected a JSON array"):
        to_examples(load_rows(str(path)), "auto", str(path))


def test_json_wrapper_object_and_bad_item(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": [{"text": "a"}, {"text": "b"}]}))
    rows = load_rows(str(path))
    assert [(r.where, r.values) for r in rows] == [(f"{path} row 1", {"text": "a"}), (f"{path} row 2", {"text": "b"})]

    path.write_text(json.dumps([{"text": "a"}, "b"]))
    with pytest.raises(DataError, match=rf"^{path} row 2: expected a JSON object with named fields, got str$"):
        load_rows(str(path))


def test_malformed_json_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]\n')
    with pytest.raises(DataError, match=rf"^{path} line 3: malformed JSON \(Expecting value at column 12\)$"):
        load_rows(str(path))


def test_csv_row_with_extra_values(tmp_path):
    path = tmp_path / "extra.csv"
    path.write_text("prompt,completion\nhi,there\nhello,world,oops\n")
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    assert str(info.value) == f"{path} row 2 (line 3): more values than the 2 header columns"


def test_csv_row_with_missing_value_reports_missing_field(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("prompt,completion\nhi,there\nhello\n")
    rows = load_rows(str(path))
    assert rows[1].values == {"prompt": "hello"}
    with pytest.raises(DataError) as info:
        to_examples(rows, "auto", str(path))
    assert str(info.value) == f"{path} row 2 (line 3): missing field 'completion'"


def test_missing_field_names_field_and_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "a", "completion": "b"}, {"prompt": "c"}, {"prompt": "d", "completion": "e"}])
    with pytest.raises(DataError) as info:
        prepare_sft_data(config_for(path), tokenizer)
    assert str(info.value) == f"{path} line 2: missing field 'completion'"


def test_null_field_is_missing(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": None}])
    with pytest.raises(DataError, match=rf"^{path} line 1: missing field 'text'$"):
        to_examples(load_rows(str(path)), "text", str(path))


def test_mistyped_field_names_field_and_type(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Add 2 and 2.", "output": "4"}, {"instruction": "Add 1 and 1.", "output": 2}])
    with pytest.raises(DataError) as info:
        prepare_sft_data(config_for(path), tokenizer)
    assert str(info.value) == f"{path} line 2: field 'output' must be a string, got int (2)"


def test_mistyped_field_value_is_shortened():
    with pytest.raises(DataError) as info:
        to_example(Row("x line 9", {"text": ["a" * 100]}), "text")
    msg = str(info.value)
    assert msg.startswith("x line 9: field 'text' must be a string, got list (['aaaa")
    assert len(msg) < 120


@pytest.mark.parametrize("messages,expected", [
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}],
     "field 'messages' item 1 has role 'bot'; expected one of ('system', 'user', 'assistant', 'tool')"),
    ([{"role": "user"}], "field 'messages' item 0 must be an object with 'role' and 'content' (or ShareGPT's "
                         "'from' and 'value')"),
    (["hi"], "field 'messages' item 0 must be an object with 'role' and 'content' (or ShareGPT's 'from' and "
             "'value')"),
    ([{"role": "user", "content": 3}],
     "field 'messages' item 0 content must be a string or a list of text parts, got int"),
    ([{"role": "user", "content": "hi"}, {"from": "bot", "value": "hello"}],
     "field 'messages' item 1 has from 'bot'; expected one of ('human', 'user', 'gpt', 'assistant', 'system', "
     "'function_call', 'observation', 'tool')"),
    ([], "field 'messages' must be a non-empty list of {role, content} messages, got list"),
    ("hello", "field 'messages' must be a non-empty list of {role, content} messages, got str"),
])
def test_bad_messages(tmp_path, messages, expected):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": messages}])
    with pytest.raises(DataError) as info:
        to_examples(load_rows(str(path)), "auto", str(path))
    assert str(info.value) == f"{path} line 2: {expected}"


def test_bad_message_in_conversational_prompt():
    row = Row("p line 4", {"prompt": [{"role": "narrator", "content": "x"}], "completion": "y"})
    with pytest.raises(DataError, match=r"^p line 4: field 'prompt' item 0 has role 'narrator'"):
        to_example(row, "prompt_completion")


def test_preference_margin_parsing_and_errors():
    ex = to_example(Row("r", {"chosen": "a", "rejected": "b", "margin": "1.5"}), "preference")
    assert (ex.prompt, ex.chosen, ex.rejected, ex.margin) == (None, "a", "b", 1.5)
    assert to_example(Row("r", {"chosen": "a", "rejected": "b", "margin": None}), "preference").margin == 0.0
    with pytest.raises(DataError, match=r"^r: field 'margin' must be a number, got 'big'$"):
        to_example(Row("r", {"chosen": "a", "rejected": "b", "margin": "big"}), "preference")
    with pytest.raises(DataError, match=r"^r: field 'margin' must be a number, got bool$"):
        to_example(Row("r", {"chosen": "a", "rejected": "b", "margin": True}), "preference")


@pytest.mark.parametrize("name,content", [
    ("empty.jsonl", ""),
    ("blank.jsonl", "\n\n  \n"),
    ("empty.csv", ""),
    ("header_only.csv", "prompt,completion\n"),
    ("empty_array.json", "[]"),
])
def test_empty_source_says_no_rows(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    assert str(info.value) == f"{path}: no rows found (the source is empty)"


def test_nonexistent_path_not_found(tmp_path):
    path = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    assert str(info.value) == f"data file not found: {path}"


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    assert str(info.value).startswith(
        f"{path}: unsupported file type '.txt'; expected one of .csv, .json, .jsonl, .ndjson, .parquet")


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match=rf"^{path}: cannot read as Parquet \("):
        load_rows(str(path))


def test_directory_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(DataError, match=r"a directory, but not one written by `datasets.save_to_disk`"):
        load_rows(str(tmp_path / "junk"))


def test_saved_dataset_dict_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]),
                               "test": datasets.Dataset.from_list([{"text": "c"}])})
    dd.save_to_disk(str(tmp_path / "dd"))
    rows = load_rows(str(tmp_path / "dd"), split="test")
    assert [(r.where, r.values) for r in rows] == [(f"{tmp_path / 'dd'}[test] row 1", {"text": "c"})]
    with pytest.raises(DataError) as info:
        load_rows(str(tmp_path / "dd"), split="validation")
    assert str(info.value) == (f"{tmp_path / 'dd'}: no split 'validation'; it has train, test "
                               "(set the source's split)")


def test_no_sources_and_no_usable_rows(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"^no training data given: pass --data PATH"):
        prepare_sft_data(DataConfig(), tokenizer)
    path = write_jsonl(tmp_path / "empty_completions.jsonl", [{"prompt": "a", "completion": ""},
                                                               {"prompt": "b", "completion": "  "}])
    with pytest.raises(DataError) as info:
        prepare_sft_data(config_for(path), tokenizer)
    assert str(info.value) == (f"{path}: none of its 2 rows is usable (0 dropped as too long, 2 dropped as "
                               "empty; data.max_length=512, overlong=truncate)")


def test_preference_rows_cannot_be_used_for_sft(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError) as info:
        prepare_sft_data(config_for(path), tokenizer)
    assert str(info.value) == (f"{path}: rows are 'preference' data, which supervised fine-tuning cannot use; "
                               "expected text or prompt_completion or alpaca or messages rows")


# ----------------------------------------------------------------------------- every file type


ALPACA_ROWS = [
    {"instruction": "Write a review of The Silent Harbor.", "input": "", "output": "It was wonderful."},
    {"instruction": "Summarize the text.", "input": "The film was long, and dull.",
     "output": 'A "long", dull film.\nSkip it.'},
    {"instruction": "Translate the sentence into French.", "output": "C'est magnifique."},
]


def _write_all_types(tmp_path: Path, rows: list[dict], csv_ok: bool = True) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = {"jsonl": write_jsonl(tmp_path / "d.jsonl", rows)}
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    out["json"] = tmp_path / "d.json"
    if csv_ok:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        out["csv"] = write_csv(tmp_path / "d.csv", rows, fields)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    out["parquet"] = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    out["saved"] = tmp_path / "saved"
    return out


def _content(examples: list[Example]) -> list[tuple]:
    return [(e.format, e.text, e.prompt, e.completion, e.messages) for e in examples]


def test_all_file_types_give_the_same_examples(tmp_path, tokenizer):
    paths = _write_all_types(tmp_path, ALPACA_ROWS)
    expected = [("alpaca", None, alpaca_prompt(r["instruction"], r.get("input", "")), r["output"], None)
                for r in ALPACA_ROWS]
    wheres = {}
    for kind, path in paths.items():
        rows = load_rows(str(path))
        fmt, examples = to_examples(rows, "auto", str(path))
        assert fmt == "alpaca", kind
        assert _content(examples) == expected, kind
        wheres[kind] = examples[2].where
    assert wheres == {
        "jsonl": f"{paths['jsonl']} line 3",
        "json": f"{paths['json']} row 3",
        "csv": f"{paths['csv']} row 3 (line 5)",  # row 2 spans lines 3-4 (quoted newline)
        "parquet": f"{paths['parquet']} row 3",
        "saved": f"{paths['saved']}[train] row 3",
    }
    # and they render identically
    rendered = {kind: prepare_sft_data(config_for(p), tokenizer).train for kind, p in paths.items()}
    first = [(r.ids, r.mask) for r in rendered["jsonl"]]
    for kind, rs in rendered.items():
        assert [(r.ids, r.mask) for r in rs] == first, kind


def test_messages_from_jsonl_json_parquet_and_saved_dataset_agree(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "user", "content": "Review it."}, {"role": "assistant", "content": "Dull."}]},
    ]
    paths = _write_all_types(tmp_path, rows, csv_ok=False)
    for kind, path in paths.items():
        fmt, examples = to_examples(load_rows(str(path)), "auto", str(path))
        assert fmt == "messages", kind
        assert [e.messages for e in examples] == [r["messages"] for r in rows], kind


def test_csv_with_utf8_bom(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text("prompt,completion\nhi,there\n", encoding="utf-8-sig")
    fmt, examples = to_examples(load_rows(str(path)), "auto", str(path))
    assert fmt == "prompt_completion"
    assert (examples[0].prompt, examples[0].completion) == ("hi", "there")


# ----------------------------------------------------------------------------- exact loss masks


def test_alpaca_prompt_text():
    assert alpaca_prompt("Add 2 and 2.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd 2 and 2.\n\n### Response:\n")
    assert alpaca_prompt("Summarize.", "A long text.") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSummarize.\n\n"
        "### Input:\nA long text.\n\n### Response:\n")
    assert alpaca_prompt("Add.", "   ") == alpaca_prompt("Add.")


def test_prompt_completion_exact_ids_and_mask(tokenizer):
    prompt, completion = "Write a review of The Silent Harbor.\n", "It was wonderful and moving."
    r = render_example(example({"prompt": prompt, "completion": completion}), tokenizer)
    p, c = tok(tokenizer, prompt), tok(tokenizer, completion)
    assert r.ids == [tokenizer.bos_token_id] + p + c + [tokenizer.eos_token_id]
    assert r.mask == [0] * (1 + len(p)) + [1] * (len(c) + 1)
    assert r.trained_tokens == len(c) + 1
    assert r.where == "src line 1"
    assert spans(r, tokenizer) == [(0, "<s>" + prompt), (1, completion + "</s>")]


@pytest.mark.parametrize("row", [
    {"instruction": "Write a review of The Silent Harbor.", "output": "It was dull."},
    {"instruction": "Summarize the text.", "input": "The film was long.", "output": "Long film."},
    {"instruction": "Summarize the text.", "input": "", "output": "Nothing to summarize."},
])
def test_alpaca_exact_ids_and_mask(tokenizer, row):
    r = render_example(example(row), tokenizer)
    p = tok(tokenizer, alpaca_prompt(row["instruction"], row.get("input", "")))
    c = tok(tokenizer, row["output"])
    assert r.ids == [tokenizer.bos_token_id] + p + c + [tokenizer.eos_token_id]
    assert r.mask == [0] * (1 + len(p)) + [1] * (len(c) + 1)
    trained_text = tokenizer.decode([i for i, m in zip(r.ids, r.mask) if m], skip_special_tokens=False)
    assert trained_text == row["output"] + "</s>"


MULTI_TURN = [
    {"role": "system", "content": "You are a film critic. Answer briefly."},
    {"role": "user", "content": "Write a review of The Silent Harbor."},
    {"role": "assistant", "content": "The Silent Harbor is a wonderful film."},
    {"role": "user", "content": "And The Golden Fox?"},
    {"role": "assistant", "content": "Dull and boring, a mess."},
]


def test_multi_turn_messages_train_exactly_the_assistant_turns(tokenizer):
    r = render_example(example({"messages": MULTI_TURN}), tokenizer)
    assert len(r.ids) == len(r.mask)
    full = tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)
    assert tokenizer.decode(r.ids, skip_special_tokens=False) == full
    trained = [text for m, text in spans(r, tokenizer) if m == 1]
    untrained = [text for m, text in spans(r, tokenizer) if m == 0]
    assert trained == ["The Silent Harbor is a wonderful film." + IM_END_NL, "Dull and boring, a mess." + IM_END_NL]
    assert untrained == [
        "<|im_start|>system\nYou are a film critic. Answer briefly.<|im_end|>\n"
        "<|im_start|>user\nWrite a review of The Silent Harbor.<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nAnd The Golden Fox?<|im_end|>\n<|im_start|>assistant\n",
    ]
    # the segments are tokenized on their own: the ids are exactly the concatenation
    expected_ids = []
    for _, text in spans(r, tokenizer):
        expected_ids += tok(tokenizer, text)
    assert r.ids == expected_ids
    assert r.mask[0] == 0
    assert r.trained_tokens == sum(len(tok(tokenizer, t)) for t in trained)


def test_messages_with_explicit_chatml_and_custom_template(bare_tokenizer):
    with pytest.raises(DataError) as info:
        render_example(example({"messages": MULTI_TURN}, where="chat.jsonl line 5"), bare_tokenizer)
    assert str(info.value).startswith("chat.jsonl line 5: chat messages need a chat template, and the tokenizer "
                                      "has none; set data.chat_template")
    r = render_example(example({"messages": MULTI_TURN}), bare_tokenizer, chat_template="chatml")
    assert bare_tokenizer.decode(r.ids, skip_special_tokens=False) == bare_tokenizer.apply_chat_template(
        MULTI_TURN, chat_template=CHATML_TEMPLATE, tokenize=False)
    assert [t for m, t in spans(r, bare_tokenizer) if m] == [MULTI_TURN[2]["content"] + IM_END_NL,
                                                             MULTI_TURN[4]["content"] + IM_END_NL]

    simple = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}assistant: {% endif %}")
    r = render_example(example({"messages": MULTI_TURN[1:3]}), bare_tokenizer, chat_template=simple)
    assert spans(r, bare_tokenizer) == [(0, "user: Write a review of The Silent Harbor.\nassistant: "),
                                        (1, "The Silent Harbor is a wonderful film.\n")]


def test_history_rewriting_template_is_refused(tokenizer):
    rewriting = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(DataError, match=r"^src line 1: the chat template does not render this conversation as a "
                                        r"growing prefix"):
        render_example(example({"messages": MULTI_TURN}), tokenizer, chat_template=rewriting)


def test_conversational_prompt_completion_trains_only_the_final_completion(tokenizer):
    prompt = MULTI_TURN[:4]
    completion = "The Golden Fox is a gem."
    r = render_example(example({"prompt": prompt, "completion": completion}), tokenizer)
    full_messages = [*prompt, {"role": "assistant", "content": completion}]
    assert tokenizer.decode(r.ids, skip_special_tokens=False) == tokenizer.apply_chat_template(
        full_messages, tokenize=False)
    assert [t for m, t in spans(r, tokenizer) if m] == [completion + IM_END_NL]
    # the earlier assistant turn is context, not trained
    untrained = "".join(t for m, t in spans(r, tokenizer) if not m)
    assert "The Silent Harbor is a wonderful film.<|im_end|>" in untrained
    assert untrained == tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    # prompt_text gives the text a model continues from
    assert prompt_text(prompt, tokenizer) == untrained
    assert prompt_text("plain", tokenizer) == "plain"


def test_train_on_prompt_trains_everything_but_position_zero(tokenizer):
    for row in ({"prompt": "Q: why?\n", "completion": "A: because."}, {"messages": MULTI_TURN},
                {"instruction": "Add.", "input": "2+2", "output": "4"}):
        plain = render_example(example(row), tokenizer)
        r = render_example(example(row), tokenizer, train_on_prompt=True)
        assert r.ids == plain.ids
        assert r.mask == [0] + [1] * (len(r.ids) - 1)


def test_text_rows_train_every_token_but_position_zero(tokenizer):
    text = "The Silent Harbor is a wonderful film. I loved every minute of it."
    r = render_example(example({"text": text}), tokenizer)
    assert r.ids == [tokenizer.bos_token_id] + tok(tokenizer, text) + [tokenizer.eos_token_id]
    assert r.mask == [0] + [1] * (len(r.ids) - 1)
    assert tokenizer.decode(r.ids, skip_special_tokens=False) == f"<s>{text}</s>"


def test_missing_eos_is_an_error(bare_tokenizer):
    import copy

    tk = copy.deepcopy(bare_tokenizer)
    tk.eos_token = None
    with pytest.raises(DataError, match="the tokenizer has no EOS token"):
        render_example(example({"text": "hello"}), tk)


@pytest.mark.parametrize("row,expected", [
    ({"text": " \n"}, False), ({"text": "x"}, True),
    ({"prompt": "a", "completion": "  "}, False), ({"prompt": "a", "completion": "b"}, True),
    ({"instruction": "a", "output": ""}, False),
    ({"messages": [{"role": "user", "content": "a"}]}, False),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}, False),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, True),
])
def test_has_content(row, expected):
    assert has_content(example(row)) is expected


# ----------------------------------------------------------------------------- max_length policy


def test_fit_length_unit():
    r = Rendered(list(range(10)), [0, 0, 0, 0, 1, 1, 1, 1, 1, 1], "w")
    assert fit_length(r, 10, "truncate") == (r, "kept")
    assert fit_length(r, 10, "drop") == (r, "kept")
    cut, status = fit_length(r, 6, "truncate")
    assert status == "truncated"
    assert (cut.ids, cut.mask, cut.where) == ([0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 1, 1], "w")
    assert fit_length(r, 6, "drop") == (None, "dropped_long")
    assert fit_length(r, 4, "truncate") == (None, "dropped_long")  # only prompt tokens would remain


LONG = ("The Silent Harbor is a wonderful and moving film, and the acting was superb from start to finish. "
        "I loved every minute of it.")


def _length_rows():
    return [
        {"prompt": "Hi.", "completion": " Ok."},        # fits
        {"prompt": "Hi.", "completion": " " + LONG},    # long completion: truncated
        {"prompt": LONG, "completion": " Ok."},         # prompt alone is too long: dropped
        {"prompt": "Hi.", "completion": "   "},         # empty completion: dropped as empty
    ]


def test_truncate_policy_counts_and_keeps_first_tokens(tmp_path, tokenizer):
    assert len(tok(tokenizer, LONG)) > 20
    path = write_jsonl(tmp_path / "len.jsonl", _length_rows())
    data = prepare_sft_data(config_for(path, max_length=16, overlong="truncate"), tokenizer)
    s = data.sources[0]
    assert (s.rows, s.kept, s.truncated, s.dropped_long, s.dropped_empty, s.train, s.held_out) == (
        4, 2, 1, 1, 1, 2, 0)
    assert data.summary_lines() == [
        f"{path} [prompt_completion]: 4 rows, 2 kept (1 truncated), 1 dropped as too long, 1 dropped as empty; "
        "2 train / 0 held out; weight 1 -> 2 rows per epoch"]
    full = render_example(example(_length_rows()[1]), tokenizer)
    assert len(full.ids) > 16
    kept_short, kept_long = data.train
    assert kept_short.ids == render_example(example(_length_rows()[0]), tokenizer).ids
    assert kept_long.ids == full.ids[:16] and kept_long.mask == full.mask[:16]
    assert kept_long.where == f"{path} line 2"
    assert kept_long.ids[-1] != tokenizer.eos_token_id


def test_drop_policy_counts(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "len.jsonl", _length_rows())
    data = prepare_sft_data(config_for(path, max_length=16, overlong="drop"), tokenizer)
    s = data.sources[0]
    assert (s.rows, s.kept, s.truncated, s.dropped_long, s.dropped_empty) == (4, 1, 0, 2, 1)
    assert [r.where for r in data.train] == [f"{path} line 1"]
    assert "1 kept (0 truncated), 2 dropped as too long, 1 dropped as empty" in data.summary_lines()[0]
    stats = data_stats(data)
    assert (stats["rows"], stats["kept"], stats["truncated"], stats["dropped"]) == (4, 1, 0, 3)


def test_overlong_prompt_kept_when_training_on_prompt(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "len.jsonl", _length_rows())
    data = prepare_sft_data(config_for(path, max_length=16, train_on_prompt=True), tokenizer)
    s = data.sources[0]
    assert (s.kept, s.truncated, s.dropped_long, s.dropped_empty) == (3, 2, 0, 1)
    assert all(len(r.ids) <= 16 and r.mask == [0] + [1] * (len(r.ids) - 1) for r in data.train)


# ----------------------------------------------------------------------------- held-out split


def test_held_out_split_is_deterministic_and_capped(tmp_path, tokenizer):
    rows = [{"prompt": f"Row {i}:", "completion": f" answer {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "many.jsonl", rows)
    cfg = config_for(path, eval_fraction=0.1)
    a, b = prepare_sft_data(cfg, tokenizer, seed=3), prepare_sft_data(cfg, tokenizer, seed=3)
    assert (a.sources[0].train, a.sources[0].held_out) == (36, 4)
    assert len(a.train) == 36 and len(a.held_out) == 4
    assert [r.where for r in a.held_out] == [r.where for r in b.held_out]
    assert {r.where for r in a.train}.isdisjoint(r.where for r in a.held_out)
    assert len({r.where for r in a.train} | {r.where for r in a.held_out}) == 40
    assert "36 train / 4 held out; weight 1 -> 36 rows per epoch" in a.summary_lines()[0]

    capped = prepare_sft_data(config_for(path, eval_fraction=0.1, eval_max_rows=3), tokenizer, seed=3)
    assert (capped.sources[0].train, capped.sources[0].held_out) == (37, 3)

    assert split_held_out(40, 0.1, 256, 3, str(path)) == split_held_out(40, 0.1, 256, 3, str(path))
    assert split_held_out(40, 0.1, 256, 3, str(path)) != split_held_out(40, 0.1, 256, 4, str(path))
    assert split_held_out(10, 0.04, 256, 0, "k") == set()   # rounds to 0
    assert split_held_out(40, 0.1, 256, 3, "source-0") == split_held_out(40, 0.1, 256, 3, "source-0")
    assert split_held_out(1, 0.9, 256, 0, "k") == set()     # never hold out everything


# ----------------------------------------------------------------------------- mixtures


def test_mixture_weights_one_and_half():
    sizes, weights = [6, 20], [1.0, 0.5]
    epochs = [mixture_indices(sizes, weights, seed=7, epoch=e) for e in range(4)]
    for idx in epochs:
        assert len(idx) == 6 + round(0.5 * 20)
        assert idx[:6] == [0, 1, 2, 3, 4, 5]
        rest = idx[6:]
        assert len(set(rest)) == 10 and all(6 <= i < 26 for i in rest)
    assert mixture_indices(sizes, weights, seed=7, epoch=0) == epochs[0]  # pure function of (seed, epoch)
    assert len({tuple(sorted(e[6:])) for e in epochs}) == 4             # a fresh subset every epoch
    assert mixture_indices(sizes, weights, seed=8, epoch=0) != epochs[0]


def test_mixture_rounding_and_whole_repeats():
    assert len(mixture_indices([5, 7], [1.0, 0.5], 0, 0)) == 5 + round(3.5) == 9
    twice = mixture_indices([3, 4], [2.0, 1.0], 0, 0)
    assert twice == [0, 1, 2, 0, 1, 2, 3, 4, 5, 6]
    one_and_half = mixture_indices([4], [1.5], 0, 1)
    counts = Counter(one_and_half)
    assert len(one_and_half) == 6 and set(counts) == {0, 1, 2, 3}
    assert sorted(counts.values()) == [1, 1, 2, 2]
    assert mixture_indices([0, 3], [1.0, 1.0], 0, 0) == [0, 1, 2]


def test_mixture_through_prepare_sft_data(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"Review number {i}."} for i in range(5)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"Q{i}?", "completion": f" A{i}."} for i in range(7)])
    data = prepare_sft_data(config_for(DataSource(path=str(a)), DataSource(path=str(b), weight=0.5)), tokenizer)
    assert data.source_sizes == [5, 7] and data.weights == [1.0, 0.5]
    assert [s.per_epoch for s in data.sources] == [5, 4]
    assert data.summary_lines()[1].endswith("weight 0.5 -> 4 rows per epoch")
    idx = mixture_indices(data.source_sizes, data.weights, seed=0, epoch=0)
    assert len(idx) == sum(s.per_epoch for s in data.sources)
    assert [data.train[i].where for i in idx[:5]] == [f"{a} line {i}" for i in range(1, 6)]
    assert all(data.train[i].where.startswith(str(b)) for i in idx[5:])


# ----------------------------------------------------------------------------- batching and padding


def _padding_fraction(batches, lengths):
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded


def test_epoch_batches_group_by_length():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(300)]
    indices = list(range(300))
    grouped = epoch_batches(indices, lengths, 8, seed=1, epoch=0, group_by_length=True)
    plain = epoch_batches(indices, lengths, 8, seed=1, epoch=0, group_by_length=False)
    for batches in (grouped, plain):
        assert sorted(i for b in batches for i in b) == indices
        assert all(1 <= len(b) <= 8 for b in batches)
        assert len(batches) == batches_per_epoch(300, 8) == 38
    assert _padding_fraction(grouped, lengths) < 0.5 * _padding_fraction(plain, lengths)
    assert epoch_batches(indices, lengths, 8, seed=1, epoch=0) == grouped
    assert epoch_batches(indices, lengths, 8, seed=1, epoch=1) != grouped
    assert epoch_batches(indices, lengths, 8, seed=2, epoch=0) != grouped


def test_epoch_batches_keep_repeated_indices():
    lengths = [3, 9, 4, 7, 1]
    indices = mixture_indices([5], [2.0], 0, 0)
    batches = epoch_batches(indices, lengths, 3, seed=0, epoch=0)
    assert Counter(i for b in batches for i in b) == Counter({i: 2 for i in range(5)})
    assert all(len(b) <= 3 for b in batches) and len(batches) == 4


def test_pad_batch():
    out = pad_batch([[5, 6, 7], [8]], [[0, 1, 1], [0]], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["loss_mask"].tolist() == [[0, 1, 1], [0, 0, 0]]
    assert all(t.dtype == torch.long for t in out.values())


# ----------------------------------------------------------------------------- inspect


def test_highlight_marks_trained_spans(tokenizer):
    r = render_example(example({"prompt": "Write a review of The Silent Harbor.\n",
                                "completion": "It was wonderful."}), tokenizer)
    assert highlight(r, tokenizer, color=False) == (
        "<s>Write a review of The Silent Harbor.\n[[It was wonderful.</s>]]")
    assert highlight(r, tokenizer, color=True) == (
        f"<s>Write a review of The Silent Harbor.\n{GREEN}It was wonderful.</s>{RESET}")
    chat = render_example(example({"messages": MULTI_TURN}), tokenizer)
    marked = highlight(chat, tokenizer, color=False)
    assert marked.count("[[") == 2 and marked.count("]]") == 2
    assert "[[Dull and boring, a mess.<|im_end|>\n]]" in marked
    assert marked.replace("[[", "").replace("]]", "") == tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)


def test_percentile_and_data_stats(tmp_path, tokenizer):
    assert percentile([], 50) == 0
    assert [percentile(list(range(1, 11)), q) for q in (0, 50, 90, 99, 100)] == [1, 5, 9, 10, 10]
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Hi.", "completion": " Ok."},
                                              {"prompt": "Hi there.", "completion": " Fine, thanks."}])
    data = prepare_sft_data(config_for(path), tokenizer)
    lengths = sorted(len(r.ids) for r in data.train)
    trained = sum(r.trained_tokens for r in data.train)
    stats = data_stats(data)
    assert stats == {"rows": 2, "kept": 2, "truncated": 0, "dropped": 0, "tokens": sum(lengths),
                     "trained_tokens": trained, "trained_fraction": trained / sum(lengths),
                     "length_p50": lengths[0], "length_p90": lengths[1], "length_p99": lengths[1],
                     "length_max": lengths[1]}
    report = inspect_report(data, tokenizer, n=1)
    assert report.count("\n--- ") == 1
    assert f"trained tokens: {trained:,} of {sum(lengths):,} ({100 * trained / sum(lengths):.1f}%)" in report


def test_inspect_cli_prints_markers_and_trained_tokens(tmp_path, tokenizer, tokenizer_dir, capsys):
    rows = [{"prompt": "Write a review of The Silent Harbor.\n", "completion": "It was wonderful."},
            {"prompt": "Write a review of The Golden Fox.\n", "completion": "It was dull."}]
    path = write_jsonl(tmp_path / "rev.jsonl", rows)
    code = main(["inspect", "--model", str(tokenizer_dir), "--data", str(path), "--n", "1", "--no-color"])
    out, err = capsys.readouterr()
    assert code == 0, err
    r1, r2 = (render_example(example(row), tokenizer) for row in rows)
    total = len(r1.ids) + len(r2.ids)
    trained = r1.trained_tokens + r2.trained_tokens
    assert "<s>Write a review of The Silent Harbor.\n[[It was wonderful.</s>]]" in out
    assert "The Golden Fox" not in out  # --n 1 shows a single row
    assert f"trained tokens: {trained} of {total} ({100 * trained / total:.1f}%)" in out
    assert f"source {path} [prompt_completion]: 2 rows, 2 kept (0 truncated)" in out
    assert f"--- {path} line 1 ({len(r1.ids)} tokens, {r1.trained_tokens} trained, marked with [[...]]) ---" in out
    assert "\033[" not in out


def test_inspect_cli_weighted_source_and_errors(tmp_path, tokenizer_dir, capsys):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"Review {i}."} for i in range(4)])
    assert main(["inspect", "--model", str(tokenizer_dir), "--data", f"{path}:0.5", "--n", "0", "--no-color"]) == 0
    out, _ = capsys.readouterr()
    assert "weight 0.5 -> 2 rows per epoch" in out

    missing = tmp_path / "missing.jsonl"
    assert main(["inspect", "--model", str(tokenizer_dir), "--data", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == f"tunelab inspect: error: data file not found: {missing}"
    assert out == ""

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\n{oops}\n')
    assert main(["inspect", "--model", str(tokenizer_dir), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tunelab inspect: error: {bad} line 3: malformed JSON")


def test_held_out_split_does_not_depend_on_where_the_data_lives(tmp_path, tokenizer):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(60)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = prepare_sft_data(config_for(write_jsonl(tmp_path / "a" / "x.jsonl", rows), eval_fraction=0.2), tokenizer)
    second = prepare_sft_data(config_for(write_jsonl(tmp_path / "b" / "y.jsonl", rows), eval_fraction=0.2), tokenizer)
    assert [r.ids for r in first.held_out] == [r.ids for r in second.held_out] and first.held_out

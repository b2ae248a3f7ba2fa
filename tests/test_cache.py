"""The tokenized cache: a second load of the same data, tokenizer and settings reads the rendered rows back
(identical ids and masks, no rendering), and changing any part of the key renders them again."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import write_jsonl
from tunelab.config import DataConfig, DataSource
from tunelab.data import dataset
from tunelab.data.cache import cache_dir
from tunelab.data.dataset import prepare_sft_data
from tunelab.demo.world import build_tokenizer, make_reviews

ROWS = [{"conversations": [{"from": "human", "value": f"Write a review of Film {i}."},
                           {"from": "gpt", "value": f"Film {i} is a quiet triumph."}], "text": "unused"}
        for i in range(12)]


def config(path, folder, **settings) -> DataConfig:
    source = {k: settings.pop(k) for k in ("format", "columns") if k in settings}
    return DataConfig(sources=[DataSource(path=str(path), **source)], eval_fraction=0.25, cache_dir=str(folder),
                      **settings)


def as_tuples(data):
    return [(r.ids, r.mask, r.where) for r in data.train + data.held_out]


def test_a_second_load_hits_the_cache_with_identical_rows(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "chat.jsonl", ROWS)
    first = prepare_sft_data(config(path, tmp_path / "cache", max_length=34), tokenizer)
    assert not first.sources[0].cached and first.sources[0].truncated > 0
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".npz"]

    def no_rendering(*args, **kwargs):
        raise AssertionError("rendered although the rows are in the cache")

    monkeypatch.setattr(dataset, "render_examples", no_rendering)
    monkeypatch.setattr(dataset, "read_examples", no_rendering)
    second = prepare_sft_data(config(path, tmp_path / "cache", max_length=34), tokenizer)
    summary = second.sources[0]
    assert summary.cached and summary.line().endswith("; tokenized rows from the cache")
    assert as_tuples(second) == as_tuples(first)
    assert (summary.rows, summary.kept, summary.truncated, summary.train, summary.held_out, summary.reading,
            summary.warnings) == (12, 12, first.sources[0].truncated, 9, 3, first.sources[0].reading,
                                  first.sources[0].warnings)
    assert [s.line().removesuffix("; tokenized rows from the cache") for s in second.sources] == \
        [s.line() for s in first.sources]


@pytest.mark.parametrize("change", ["data", "tokenizer", "chat_template", "max_length", "overlong",
                                    "train_on_prompt", "columns", "format"])
def test_changing_any_part_of_the_key_misses_the_cache(tmp_path, tokenizer, change):
    path = write_jsonl(tmp_path / "chat.jsonl", ROWS)
    folder = tmp_path / "cache"
    base = dict(max_length=34)
    prepare_sft_data(config(path, folder, **base), tokenizer)
    assert prepare_sft_data(config(path, folder, **base), tokenizer).sources[0].cached
    tok, settings = tokenizer, dict(base)
    if change == "data":
        write_jsonl(path, ROWS[:-1] + [{**ROWS[-1], "conversations": ROWS[0]["conversations"]}])
    elif change == "tokenizer":
        tok = build_tokenizer([r["text"] for r in make_reviews(60, seed=3)], vocab_size=400)
    elif change == "chat_template":
        settings["chat_template"] = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    elif change == "max_length":
        settings["max_length"] = 35
    elif change == "overlong":
        settings["overlong"] = "drop"
        settings["max_length"] = 512
        prepare_sft_data(config(path, folder, max_length=512), tokenizer)  # cached with truncate at this length
    elif change == "train_on_prompt":
        settings["train_on_prompt"] = True
    elif change == "columns":
        settings["columns"] = {"conversations": "conversations"}
    elif change == "format":
        settings["format"] = "sharegpt"
    again = prepare_sft_data(config(path, folder, **settings), tok)
    assert not again.sources[0].cached
    assert prepare_sft_data(config(path, folder, **settings), tok).sources[0].cached  # and is stored under its key


def test_a_damaged_entry_is_rendered_again_and_the_cache_can_be_turned_off(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "chat.jsonl", ROWS)
    folder = tmp_path / "cache"
    first = prepare_sft_data(config(path, folder), tokenizer)
    (npz,) = folder.glob("*.npz")
    npz.write_bytes(b"not a zip file")
    again = prepare_sft_data(config(path, folder), tokenizer)
    assert not again.sources[0].cached and as_tuples(again) == as_tuples(first)
    with np.load(npz, allow_pickle=False) as arrays:  # rewritten whole
        assert int(arrays["lengths"].sum()) == len(arrays["ids"])

    assert cache_dir(None) is None and cache_dir("none") is None
    monkeypatch.setenv("TUNELAB_CACHE_DIR", "none")
    assert cache_dir("auto") is None
    monkeypatch.setenv("TUNELAB_CACHE_DIR", str(tmp_path / "env"))
    assert cache_dir("auto") == tmp_path / "env"
    monkeypatch.delenv("TUNELAB_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("auto") == tmp_path / "xdg" / "tunelab" / "tokenized"
    off = prepare_sft_data(DataConfig(sources=[DataSource(path=str(path))], cache_dir=None), tokenizer)
    assert not off.sources[0].cached
    assert sorted(p.suffix for p in folder.iterdir()) == [".json", ".npz"]  # nothing new, no temporary files left


# ----------------------------------------------------------------------------- rm, dpo and kto

PAIR_ROWS = [{"conversations": [{"from": "human", "value": f"Write a review of Film {i}."}],
              "chosen": {"from": "gpt", "value": f"Film {i} is a quiet triumph."},
              "rejected": {"from": "gpt", "value": "Dull."}, "margin": i / 4} for i in range(8)]
TEXT_PAIR_ROWS = [{"prompt": f"Review of Film {i}: ", "chosen": "a quiet triumph, patient and humane.",
                   "rejected": "dull."} for i in range(4)]
FEEDBACK_ROWS = [{"conversations": [{"from": "human", "value": f"Write a review of Film {i}."},
                                    {"from": "gpt", "value": f"Film {i} is {'superb' if i % 2 else 'dull'}."}],
                  "kto_tag": bool(i % 2)} for i in range(8)]


def prepare(recipe):
    from tunelab.data.feedback import prepare_feedback_data
    from tunelab.data.preference import prepare_policy_pairs, prepare_preference_data

    return {"rm": prepare_preference_data, "dpo": prepare_policy_pairs, "kto": prepare_feedback_data}[recipe]


def pair_config(paths, folder, **settings) -> DataConfig:
    return DataConfig(sources=[DataSource(path=str(p)) for p in paths], eval_fraction=0.25, cache_dir=str(folder),
                      **settings)


@pytest.mark.parametrize("recipe", ["rm", "dpo", "kto"])
def test_rm_dpo_and_kto_hit_the_cache_with_identical_items(tmp_path, tokenizer, monkeypatch, recipe):
    rows = FEEDBACK_ROWS if recipe == "kto" else PAIR_ROWS
    paths = [write_jsonl(tmp_path / "a.jsonl", rows), write_jsonl(tmp_path / "b.jsonl", TEXT_PAIR_ROWS)]
    folder = tmp_path / "cache"
    length = 30 if recipe == "kto" else 36  # some rows truncated
    first = prepare(recipe)(pair_config(paths, folder, max_length=length), tokenizer)
    assert not any(s.cached for s in first.sources) and sum(s.truncated for s in first.sources) > 0
    assert len(list(folder.glob("*.npz"))) == 2

    def no_rendering(*args, **kwargs):
        raise AssertionError("rendered although the rows are in the cache")

    monkeypatch.setattr(dataset, "read_examples", no_rendering)
    second = prepare(recipe)(pair_config(paths, folder, max_length=length), tokenizer)
    assert all(s.cached for s in second.sources)
    assert second.train == first.train and second.held_out == first.held_out  # every id, mask, margin, verdict
    assert [s.line().removesuffix("; tokenized rows from the cache") for s in second.sources] == \
        [s.line() for s in first.sources]
    if recipe == "rm":
        assert [p.margin for p in second.train + second.held_out][:8] == [p.margin for p in first.train
                                                                          + first.held_out][:8]
        assert {p.margin for p in second.train + second.held_out} >= {0.25, 0.5}
    if recipe == "kto":
        assert {row.desirable for item in second.train for row in item.rows} == {True, False}
        assert second.sources[1].format == "preference pairs, 2 rows each"  # the text pairs give 2 rows each


@pytest.mark.parametrize("recipe", ["rm", "dpo", "kto"])
@pytest.mark.parametrize("change", ["data", "tokenizer", "max_length", "overlong", "chat_template", "recipe"])
def test_rm_dpo_and_kto_miss_the_cache_when_the_key_changes(tmp_path, tokenizer, recipe, change):
    rows = FEEDBACK_ROWS if recipe == "kto" else PAIR_ROWS
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    folder = tmp_path / "cache"
    base = dict(max_length=36)
    prepare(recipe)(pair_config([path], folder, **base), tokenizer)
    assert prepare(recipe)(pair_config([path], folder, **base), tokenizer).sources[0].cached
    tok, settings, other = tokenizer, dict(base), recipe
    if change == "data":
        write_jsonl(path, rows[:-1] + [rows[0]])
    elif change == "tokenizer":
        tok = build_tokenizer([r["text"] for r in make_reviews(60, seed=3)], vocab_size=400)
    elif change == "max_length":
        settings["max_length"] = 37
    elif change == "overlong":
        settings["overlong"] = "drop"
        settings["max_length"] = 512
        prepare(recipe)(pair_config([path], folder, max_length=512), tokenizer)
    elif change == "chat_template":
        settings["chat_template"] = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    elif change == "recipe":  # the same rows rendered for another recipe are another entry
        other = {"rm": "dpo", "dpo": "rm", "kto": "sft"}[recipe]
        if other == "sft":
            assert not prepare_sft_data(pair_config([path], folder, **settings), tok).sources[0].cached
            return
    again = prepare(other)(pair_config([path], folder, **settings), tok)
    assert not again.sources[0].cached
    assert prepare(other)(pair_config([path], folder, **settings), tok).sources[0].cached


@pytest.mark.parametrize("recipe", ["rm", "dpo", "kto"])
def test_rm_dpo_and_kto_render_a_damaged_entry_again(tmp_path, tokenizer, recipe):
    rows = FEEDBACK_ROWS if recipe == "kto" else PAIR_ROWS
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    folder = tmp_path / "cache"
    first = prepare(recipe)(pair_config([path], folder), tokenizer)
    (npz,) = folder.glob("*.npz")
    with np.load(npz, allow_pickle=False) as arrays:  # a valid file that disagrees with its .json
        np.savez(npz, **{**dict(arrays), "counts": arrays["counts"][:-1]})
    again = prepare(recipe)(pair_config([path], folder), tokenizer)
    assert not again.sources[0].cached and again.train == first.train and again.held_out == first.held_out
    assert prepare(recipe)(pair_config([path], folder), tokenizer).sources[0].cached  # rewritten whole
    npz.write_bytes(b"not a zip file")
    assert not prepare(recipe)(pair_config([path], folder), tokenizer).sources[0].cached

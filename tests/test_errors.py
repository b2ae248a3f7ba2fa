"""Bad input, bad files, full disks and hostile text: each ends in one `tunelab CMD: error: ...` line, exit 2,
no traceback, nothing half-written; names and text taken from data never reach a path, a report or a
terminal raw."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_tiny_model_dir, write_jsonl
from tunelab.cli import eval_output_paths, main
from tunelab.data.load import DataError, load_rows
from tunelab.rewards import RewardSourceError, load_reward_fn
from tunelab.safety import markdown_text, safe_filename, terminal_safe

MISSING_MODEL = "./no-such-model-folder"  # an option error must be reported before this is looked at


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def reward_dir(tiny_dir, tmp_path_factory):
    """A model with a (random but saved) score head: what `score` accepts."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("rm")
    AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter_dir(tiny_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(path)
    return path


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Write a review of Film {i}.",
                                                     "completion": "A fine film."} for i in range(3)])


def fails(argv: list[str], capsys, expected: str, code: int = 2) -> str:
    """Run the command; assert its exit status and that stderr holds `expected` and no traceback."""
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse reports option errors itself, with status 2
        status = exc.code
    err = capsys.readouterr().err
    assert status == code, err
    assert expected in err, err
    assert "Traceback" not in err
    return err


# ---------------------------------------------------------------------------------------------
# Option values, checked before any model is loaded


@pytest.mark.parametrize("argv, expected", [
    (["generate", "--prompts", "p.jsonl", "--num-beams", "0"], "argument --num-beams: must be 1 or more, got 0"),
    (["generate", "--prompts", "p.jsonl", "--batch-size", "0"], "argument --batch-size: must be 1 or more, got 0"),
    (["generate", "--prompts", "p.jsonl", "--max-new-tokens", "-1"], "argument --max-new-tokens: must be 1 or more"),
    (["generate", "--prompts", "p.jsonl", "--top-p", "1.5"], "argument --top-p: must be at most 1, got 1.5"),
    (["generate", "--prompts", "p.jsonl", "--temperature", "inf"], "argument --temperature: must be a finite"),
    (["generate", "--prompts", "p.jsonl", "--temperature", "-0.5"], "argument --temperature: must be 0 or more"),
    (["generate", "--prompts", "p.jsonl", "--top-k", "two"], "argument --top-k: expected a whole number, got 'two'"),
    (["score", "--data", "p.jsonl", "--batch-size", "0"], "argument --batch-size: must be 1 or more, got 0"),
    (["eval", "--data", "p.jsonl", "--limit", "0"], "argument --limit: must be 1 or more, got 0"),
    (["eval", "--data", "p.jsonl", "--limit", "-2"], "argument --limit: must be 1 or more, got -2"),
    (["eval", "--data", "p.jsonl", "--few-shot", "-1"], "argument --few-shot: must be 0 or more, got -1"),
    (["embed", "--data", "p.jsonl", "--output", "e.npy", "--batch-size", "0"], "argument --batch-size: must be 1"),
    (["sft", "--data", "p.jsonl", "--output", "o", "--lr", "inf"], "argument --lr: must be a finite number"),
    (["sft", "--data", "p.jsonl", "--output", "o", "--lr", "0"], "argument --lr: must be more than 0"),
    (["dpo", "--data", "p.jsonl", "--output", "o", "--epochs", "nan"], "argument --epochs: must be a finite"),
    (["ppo", "--data", "p.jsonl", "--output", "o", "--max-steps", "0"], "argument --max-steps: must be 1 or more"),
    (["rm", "--data", "p.jsonl", "--output", "o", "--batch-size", "-4"], "argument --batch-size: must be 1 or more"),
])
def test_bad_option_values_are_refused_before_loading(argv, expected, capsys):
    fails([argv[0], "--model", MISSING_MODEL, *argv[1:]], capsys, expected)


def test_min_new_tokens_above_max_is_refused(capsys):
    fails(["generate", "--model", MISSING_MODEL, "--prompts", "p.jsonl", "--min-new-tokens", "9",
           "--max-new-tokens", "4"], capsys,
          "min_new_tokens (--min-new-tokens) 9 is more than max_new_tokens (--max-new-tokens) 4")


@pytest.mark.parametrize("override, key", [("train.lr=inf", "train.lr"), ("dpo.beta=nan", "dpo.beta"),
                                           ("train.max_grad_norm=-inf", "train.max_grad_norm")])
def test_config_rejects_non_finite_numbers_naming_the_key(override, key, tmp_path, capsys):
    command = override.split(".")[0] if override.startswith("dpo") else "sft"
    err = fails([command, "--model", MISSING_MODEL, "--data", "p.jsonl", "--output", str(tmp_path / "o"), override],
                capsys, f"config value '{key}' (from override '{override}')")
    assert "finite number" in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# One line, exit 2, no stack; --debug and TUNELAB_DEBUG=1 show it


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, cwd=Path(__file__).parents[1])


def test_one_error_line_and_the_traceback_on_request(tmp_path):
    plain = _cli("report", str(tmp_path / "nothing"))
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [f"tunelab report: error: {tmp_path / 'nothing'} has no "
                                                 "metrics.jsonl: is it a tunelab run directory?"]
    for extra, env in ((["--debug"], None), ([], {"TUNELAB_DEBUG": "1"})):
        shown = _cli(*extra, "report", str(tmp_path / "nothing"), env=env)
        assert shown.returncode == 2
        assert "Traceback (most recent call last)" in shown.stderr
        assert shown.stderr.strip().endswith("is it a tunelab run directory?")


def test_an_unforeseen_failure_is_one_line_with_status_1(monkeypatch, tmp_path, capsys):
    import tunelab.report

    def broken(*_):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(tunelab.report, "write_report", broken)
    err = fails(["report", str(tmp_path)], capsys, "unexpected RuntimeError: something inside broke (rerun with "
                "--debug to see where)", code=1)
    assert len(err.strip().splitlines()) == 1


def test_os_errors_are_named_in_words(monkeypatch, tmp_path, capsys):
    import tunelab.report

    def denied(*_):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "plots"))

    monkeypatch.setattr(tunelab.report, "write_report", denied)
    fails(["report", str(tmp_path)], capsys, f"tunelab report: error: {tmp_path / 'plots'}: permission denied")


# ---------------------------------------------------------------------------------------------
# Output files: folders, full and read-only disks


def test_generate_output_naming_a_folder_is_refused_before_loading(tmp_path, capsys):
    fails(["generate", "--model", MISSING_MODEL, "--prompts", "p.jsonl", "--output", str(tmp_path)], capsys,
          f"--output {tmp_path} is a folder; name a file to write")
    fails(["score", "--model", MISSING_MODEL, "--data", "p.jsonl", "--output", str(tmp_path)], capsys,
          "is a folder")
    fails(["eval", "--model", MISSING_MODEL, "--data", "p.jsonl", "--output", str(tmp_path)], capsys, "is a folder")
    (tmp_path / "e.npy").mkdir()
    fails(["embed", "--model", MISSING_MODEL, "--data", "p.jsonl", "--output", str(tmp_path / "e.npy")], capsys,
          f"--output {tmp_path / 'e.npy'} is a folder")


def test_an_output_that_is_also_an_input_is_refused(prompts, capsys):
    for argv in (["generate", "--prompts", str(prompts)], ["score", "--data", str(prompts)],
                 ["eval", "--data", str(prompts)]):
        fails([argv[0], "--model", MISSING_MODEL, *argv[1:], "--output", str(prompts)], capsys,
              f"--output {prompts} is also an input of the command")
    assert len(prompts.read_text().splitlines()) == 3


def _failing_writes(monkeypatch, code: int) -> None:
    """Writes of tunelab's temporary files fail with OSError `code`, as on a full or read-only disk."""
    real = pathlib.Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name.startswith(".tmp-"):
            raise OSError(code, os.strerror(code), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "the disk is full"),
                                          (errno.EROFS, "the file system is read-only"),
                                          (errno.EACCES, "permission denied")])
def test_disk_errors_writing_results_name_the_file(code, reason, tiny_dir, reward_dir, prompts, tmp_path,
                                                   monkeypatch, capsys):
    _failing_writes(monkeypatch, code)
    out = tmp_path / "out" / "gen.jsonl"
    fails(["generate", "--model", str(tiny_dir), "--prompts", str(prompts), "--output", str(out),
           "--max-new-tokens", "2"], capsys, f"tunelab generate: error: cannot write {out}: {reason}")
    fails(["score", "--model", str(reward_dir), "--data", str(prompts), "--output", str(out)], capsys,
          f"cannot write {out}: {reason}")
    results = tmp_path / "out" / "r.json"
    fails(["eval", "--model", str(tiny_dir), "--data", str(prompts), "--output", str(results),
           "--max-new-tokens", "2"], capsys, f"cannot write {results}: {reason}")
    assert not [p for p in (tmp_path / "out").iterdir()]  # no result, no temporary file left


def test_a_full_disk_writing_embeddings_names_the_file(tiny_dir, tmp_path, monkeypatch, capsys):
    real = pathlib.Path.open

    def full_open(self, *args, **kwargs):
        if self.name.startswith(".tmp-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *args, **kwargs)

    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": "a film"}, {"text": "a book"}])
    monkeypatch.setattr(pathlib.Path, "open", full_open)
    out = tmp_path / "e.npy"
    fails(["embed", "--model", str(tiny_dir), "--data", str(texts), "--output", str(out)], capsys,
          f"tunelab embed: error: cannot write {out}: the disk is full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


def test_eval_limit_below_one_is_refused_from_python_too(tiny_dir, prompts):
    from tunelab.evaluation import run_eval

    with pytest.raises(ValueError, match="limit must be 1 or more"):
        run_eval(str(tiny_dir), str(prompts), limit=-2)


def test_eval_outputs_go_where_named_and_never_onto_each_other(tiny_dir, prompts, tmp_path, capsys):
    for name in ("r.md", "r.json", "r", "r.generations.jsonl"):
        paths = eval_output_paths(str(tmp_path / name))
        assert len(set(paths.values())) == 3, name
    out = tmp_path / "r.md"
    assert main(["eval", "--model", str(tiny_dir), "--data", str(prompts), "--output", str(out),
                 "--max-new-tokens", "2"]) == 0
    assert out.read_text().startswith("| model |")
    assert json.loads((tmp_path / "r.json").read_text())["n"] == 3
    assert len((tmp_path / "r.generations.jsonl").read_text().splitlines()) == 3
    assert "results -> " in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Models and weights files


def test_pickle_only_and_damaged_weights_are_refused_naming_the_file(tiny_dir, prompts, tmp_path, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = Path(shutil.copytree(tiny_dir, tmp_path / "pickled"))
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    base = ["--prompts", str(prompts), "--max-new-tokens", "2"]
    fails(["generate", "--model", str(pickled), *base], capsys,
          f"{pickled} holds its weights only as pickles (pytorch_model.bin), which tunelab never loads")
    truncated = Path(shutil.copytree(tiny_dir, tmp_path / "truncated"))
    with (truncated / "model.safetensors").open("r+b") as handle:
        handle.truncate(5000)
    fails(["generate", "--model", str(truncated), *base], capsys,
          f"weights file {truncated / 'model.safetensors'} cannot be read: it is truncated: 5000 bytes")
    empty = Path(shutil.copytree(tiny_dir, tmp_path / "empty"))
    (empty / "model.safetensors").write_bytes(b"")
    fails(["score", "--model", str(empty), "--data", str(prompts)], capsys,
          f"weights file {empty / 'model.safetensors'} cannot be read: it is empty (0 bytes)")


def test_a_plain_causal_lm_is_not_a_reward_model(tiny_dir, reward_dir, prompts, tmp_path, capsys):
    out = tmp_path / "scored.jsonl"
    err = fails(["score", "--model", str(tiny_dir), "--data", str(prompts), "--output", str(out)], capsys,
                f"{tiny_dir} is not a trained reward model: its weights lack score.weight")
    assert "LOAD REPORT" not in err and not out.exists()
    assert main(["score", "--model", str(reward_dir), "--data", str(prompts), "--output", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 3
    fails(["ppo", "--model", str(tiny_dir), "--data", str(prompts), "--output", str(tmp_path / "ppo"), "--reward",
           str(tiny_dir), "--max-steps", "1", "--batch-size", "2", "--quiet"], capsys,
          "is not a trained reward model")
    assert not (tmp_path / "ppo").exists()  # and the failed start left no config.yaml behind


# ---------------------------------------------------------------------------------------------
# Reward callables that misbehave


def none_reward(prompts, responses):
    return None


def text_reward(prompts, responses):
    return ["good"] * len(responses)


def short_reward(prompts, responses):
    return [1.0]


def nan_reward(prompts, responses):
    return [0.0, float("nan"), 0.0]


def raising_reward(prompts, responses):
    raise KeyError("score")


@pytest.mark.parametrize("name, expected", [
    ("none_reward", "returned None (NoneType) for a batch of 3 responses"),
    ("text_reward", "returned 'good' (str) for response 0 of the batch of 3"),
    ("short_reward", "returned 1 scores for 3 responses"),
    ("nan_reward", "returned nan (float) for response 1 of the batch of 3"),
    ("raising_reward", "failed on a batch of 3 responses: KeyError: 'score'"),
])
def test_misbehaving_reward_callables_are_named(name, expected):
    reward = load_reward_fn(f"tests.test_errors:{name}")
    with pytest.raises(RewardSourceError, match="^reward tests.test_errors:" + name) as caught:
        reward(["p"] * 3, ["a", "b", "c"])
    assert expected in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Data files


def test_invalid_utf8_prompts_end_in_one_line_before_loading(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
    for command in ("generate --prompts", "eval --data"):
        name, flag = command.split()
        fails([name, "--model", MISSING_MODEL, flag, str(tmp_path / "p.jsonl")], capsys,
              f"tunelab {name}: error: {tmp_path / 'p.jsonl'} line 2: not UTF-8 text")


@pytest.mark.parametrize("name, content, where", [
    ("d.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "d.jsonl line 2: not UTF-8 text (byte 0xe9 at column 14)"),
    ("d.csv", b"text\nfine\n\xff\xfe\n", "d.csv line 3: not UTF-8 text (byte 0xff at column 1)"),
    ("d.json", b'[{"text": "fine"},\n {"text": "\x80"}]', "d.json line 2: not UTF-8 text (byte 0x80 at column 12)"),
])
def test_invalid_utf8_names_the_file_and_line(name, content, where, tmp_path):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as caught:
        load_rows(str(tmp_path / name))
    assert str(caught.value) == f"{tmp_path}/{where}; save the file as UTF-8"


def test_a_config_file_that_is_not_utf8_names_its_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_bytes(b"train:\n  lr: \xff\n")
    fails(["sft", "--config", str(tmp_path / "c.yaml"), "--model", MISSING_MODEL, "--data", "p.jsonl", "--output",
           str(tmp_path / "o")], capsys, f"config file {tmp_path / 'c.yaml'} line 2: not UTF-8 text (byte 0xff")


# ---------------------------------------------------------------------------------------------
# Nothing lost: merge outputs, config.yaml of a run that never started


def test_merge_output_never_replaces_the_run_or_other_files(adapter_dir, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    fails(["merge", str(adapter_dir), "--output", str(other)], capsys,
          f"output (--output) {other} already holds files that are not an earlier merge's; pass overwrite=True "
          "(--overwrite)")
    assert (other / "notes.txt").read_text() == "keep me"
    for target in (adapter_dir, adapter_dir / "merged", adapter_dir.parent):
        fails(["merge", str(adapter_dir), "--output", str(target)], capsys, "which the merge reads")
    assert (adapter_dir / "adapter_config.json").is_file()
    merged = tmp_path / "merged"
    assert main(["merge", str(adapter_dir), "--output", str(merged)]) == 0
    assert main(["merge", str(adapter_dir), "--output", str(merged)]) == 0  # an earlier merge is replaced
    assert main(["merge", str(adapter_dir), "--output", str(other), "--overwrite"]) == 0
    assert not (other / "notes.txt").exists() and (other / "config.json").is_file()


def test_a_run_that_fails_at_start_leaves_no_config_behind(tiny_dir, tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Write a review of X.", "chosen": " Great.",
                                                    "rejected": " Bad."}] * 4)
    out = tmp_path / "run"
    base = ["dpo", "--model", str(tiny_dir), "--data", str(pairs), "--output", str(out), "--peft", "none",
            "--max-steps", "1", "--batch-size", "2", "--quiet", "train.report=false"]
    fails([*base, "--ref", str(tmp_path / "missing-ref")], capsys, "model path does not exist")
    assert not out.exists()
    assert main(base) == 0  # the corrected command needs no --overwrite


# ---------------------------------------------------------------------------------------------
# Hostile names and text


def test_metric_keys_never_leave_the_plots_folder_and_are_escaped(tmp_path):
    run = tmp_path / "deep" / "run"
    run.mkdir(parents=True)
    keys = ["../../escaped", "/tmp/absolute", "a/b", "a_b", "..", "<img src=x onerror=alert(1)>", "$x$", "\x1b[31mred"]
    write_jsonl(run / "metrics.jsonl", [{"step": 1, "loss": 1.0, **{k: 2.0 for k in keys}},
                                        {"step": 2, "loss": 0.5}, {"loss": 3.0}])
    assert main(["report", str(run)]) == 0
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    assert len(written) == len(keys) + 1
    assert all(p.parent == Path("deep/run/plots") and not p.name.startswith(".") for p in written)
    report = (run / "report.md").read_text()
    assert "<img" not in report and "&lt;img src=x onerror=alert\\(1\\)&gt;" in report
    assert "\x1b" not in report and "](plots/a_b.png)" in report and "](plots/a_b-2.png)" in report


def test_control_characters_from_data_never_reach_the_terminal(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "\x1b[2J\x1b]0;owned\x07Hi\rX", "completion": "ok\x9b"}] * 2)
    assert main(["inspect", "--model", str(tiny_dir), "--data", str(data), "--n", "1"]) == 0
    captured = capsys.readouterr()
    assert "\x1b" not in captured.out + captured.err and "\r" not in captured.out and "\x9b" not in captured.out
    assert "Hi\\x0dX" in captured.out


def test_terminal_file_name_and_markdown_escaping():
    assert terminal_safe("a\x1b[31mb\x1b[0m\tc\nd\re\x00\x9b") == "ab\tc\nd\\x0de\\x00\\x9b"
    assert [safe_filename(n) for n in ("../x", "..", "", "a b/c", ".hidden", "loss")] == [
        "___x", "__", "_", "a_b_c", "_hidden", "loss"]
    assert markdown_text("| <b>*x*</b>\n$y$") == "\\| &lt;b&gt;\\*x\\*&lt;/b&gt; \\$y\\$"


def test_eval_table_escapes_model_names():
    from tunelab.evaluation import markdown_table

    table = markdown_table({"evil|<script>": {"n": 2, "bleu": 1.5}})
    assert table.splitlines()[2] == "| evil\\|&lt;script&gt; | 2 | 1.5 |"


def test_chat_replies_are_shown_without_their_control_characters(tiny_dir, monkeypatch):
    import io

    import tunelab.generation
    from tunelab.generation import GenerationOptions, chat_loop

    monkeypatch.setattr(tunelab.generation, "generate", lambda *a, **k: ["\x1b[2J\x1b]0;title\x07hi\rthere"])
    stdout = io.StringIO()
    chat_loop(str(tiny_dir), GenerationOptions(num_beams=2), stdin=io.StringIO("hello\n/exit\n"), stdout=stdout)
    assert "model> hi\\x0dthere\n" in stdout.getvalue() and "\x1b" not in stdout.getvalue()


def test_label_stats_show_hostile_labeler_names_escaped(tmp_path, capsys):
    rows = [{"item": "i1", "prompt": "p", "chosen": "x", "rejected": "y", "chosen_source": "m\x1b[31m",
             "rejected_source": "n", "choice": "A", "labeler": "\x1b]0;owned\x07eve\r",
             "time": "2025-01-01T00:00:01.000Z"}]
    write_jsonl(tmp_path / "prefs.jsonl", rows)
    assert main(["label", "--stats", str(tmp_path / "prefs.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "eve\\x0d" in out and "\x1b" not in out and "\r" not in out


def test_label_guidelines_render_raw_html_and_script_links_as_text():
    pytest.importorskip("markdown_it")
    from tunelab.label.server import render_guidelines

    page = render_guidelines("<script>alert(1)</script>\n\n[click](javascript:alert(1)) <img src=x onerror=y>")
    assert "<script" not in page and "<img" not in page and 'href="javascript' not in page
    assert "&lt;script&gt;" in page


def test_a_reward_pipeline_on_a_model_without_a_classifier_head_is_refused(tiny_dir, reward_dir):
    from tunelab.modeling import ModelLoadError

    with pytest.raises(ModelLoadError, match="is not a trained text classifier: its weights lack score.weight"):
        load_reward_fn(f"pipeline:{tiny_dir}")
    assert len(load_reward_fn(f"pipeline:{reward_dir}")(["p", "q"], ["a", "b"])) == 2


def test_an_adapter_whose_base_is_missing_names_it(tiny_dir, adapter_dir, tmp_path, prompts, capsys):
    import shutil

    moved = Path(shutil.copytree(adapter_dir, tmp_path / "adapter"))
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/no/such/base"}))
    for argv in (["generate", "--model", str(moved), "--prompts", str(prompts)],
                 ["merge", str(moved), "--output", str(tmp_path / "merged")]):
        fails(argv, capsys, f"the adapter {moved} is for the base model '/no/such/base', which does not exist here")
    assert not (tmp_path / "merged").exists()


def test_report_skips_metric_lines_that_are_not_objects(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('[1, 2]\n"text"\n{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    assert main(["report", str(tmp_path)]) == 0
    assert "![loss](plots/loss.png)" in (tmp_path / "report.md").read_text()


def test_error_lines_show_control_characters_from_data_escaped(tmp_path, capsys):
    rows = [{"anchor\x1b[2J": "a", "positive\r": "b"}] * 4
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    err = fails(["score", "--model", MISSING_MODEL, "--data", str(data)], capsys, "nothing to score")
    assert "\x1b" not in err and "\r" not in err
    from tunelab.cli import _error_line
    from tunelab.data.load import DataError as Error

    assert _error_line("sft", Error("field \x1b[31mred\x07"), known=True) == "tunelab sft: error: field red\\x07"


def test_a_truncated_checkpoint_file_is_named_on_resume(tiny_dir, prompts, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["sft", "--model", str(tiny_dir), "--data", str(prompts), "--output", str(out), "--batch-size", "2",
            "--quiet", "train.save_every=1", "train.report=false", "data.eval_fraction=0"]
    assert main([*argv, "--max-steps", "1"]) == 0
    weights = out / "checkpoints" / "step-1" / "trainable.safetensors"
    whole = weights.stat().st_size
    with weights.open("r+b") as handle:
        handle.truncate(whole // 2)
    # the checkpoint's manifest catches it first: the checkpoint is set aside and, with no other, nothing resumes
    fails([*argv, "--max-steps", "2", "--resume"], capsys, f"no intact checkpoint (step-1: trainable.safetensors is "
          f"{whole // 2} bytes, {whole} were written (truncated or overwritten))")
    # a checkpoint written before manifests existed is loaded unchecked: the truncated file is named when read
    damaged = out / "checkpoints" / "damaged-step-1"
    damaged.rename(out / "checkpoints" / "step-1")
    (out / "checkpoints" / "step-1" / "manifest.json").unlink()
    fails([*argv, "--max-steps", "2", "--resume"], capsys, f"checkpoint file {weights} cannot be read: it is "
          "truncated")


def test_markdown_cells_keep_metric_names_readable():
    from tunelab.safety import markdown_text

    assert markdown_text("positive_share") == "positive_share"  # inside a word: no emphasis, nothing to escape
    assert markdown_text("_x_ *y*") == r"\_x\_ \*y\*"
    assert markdown_text("<b>|</b>") == r"&lt;b&gt;\|&lt;/b&gt;"

"""`tunelab synth`: a taxonomy of two leaves (a skill, and knowledge backed by a document), a tiny teacher trained
here to answer in the prompts' `Q:` format so that generation is real, and a scripted teacher for exact filter
counts."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import make_tiny_model_dir, write_jsonl
from tests.kill_worker import run_cli
from tunelab import synth
from tunelab.cli import main
from tunelab.demo import world as demo_world
from tunelab.taxonomy import read_taxonomy, split_chunks

CONTEXT = multiprocessing.get_context("forkserver")
CONTEXT.set_forkserver_preload(["tests.kill_worker"])
TITLES = demo_world.make_titles(60, 1)
SHORT = [r["text"].split(".")[0] + "." for r in demo_world.make_reviews(60, 2)]
FILTER_KEYS = ("unparseable", "empty", "too_long", "duplicate", "copies_question", "judge_low")


def write_leaf(root: Path, name: str, task: str, seeds: list[dict], document: str | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    data = {"task_description": task, "created_by": "tests", "seed_examples": seeds}
    if document is not None:
        (folder / "notes.md").write_text(document)
        data["document"] = ["notes.md"]
    path = folder / "qna.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def film_seeds(n: int, offset: int = 0) -> list[dict]:
    return [{"question": f"Is {TITLES[offset + i]} worth watching?", "answer": SHORT[offset + i]} for i in range(n)]


def make_taxonomy(root: Path) -> Path:
    write_leaf(root, "skills/films", "Ask whether a film is worth watching.", film_seeds(5))
    write_leaf(root, "knowledge/cinema", "Ask about the films in the document.", film_seeds(4, 10),
               "# Films\n\n" + "\n\n".join(SHORT[20:26]))
    return root


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The taxonomy, a teacher trained (full fine-tuning, 80 steps) on replies in exactly the prompts' format,
    and a general dataset for the replay mixture."""
    root = tmp_path_factory.mktemp("synth")
    taxonomy = make_taxonomy(root / "taxonomy")
    leaves = read_taxonomy(taxonomy, chunk_words=40)
    make_tiny_model_dir(root / "base", hidden_size=64)
    rng, rows = random.Random(0), []
    for i in range(160):
        leaf = leaves[i % 2]
        seeds = rng.sample(leaf.seeds, 3)
        chunk = rng.choice(leaf.chunks) if leaf.chunks else None
        questions = [f"Is {rng.choice(TITLES)} worth watching?" for _ in range(3)]
        rows.append({"messages": [{"role": "user", "content": synth.question_prompt(leaf, seeds, chunk, 3)},
                                  {"role": "assistant", "content": "\n".join(f"Q: {q}" for q in questions)}]})
        rows.append({"messages": [{"role": "user", "content": synth.answer_prompt(leaf, seeds, chunk, questions[0])},
                                  {"role": "assistant", "content": rng.choice(SHORT)}]})
    write_jsonl(root / "teach.jsonl", rows)
    assert main(["sft", "--model", str(root / "base"), "--data", str(root / "teach.jsonl"), "--output",
                 str(root / "teacher"), "--max-steps", "80", "--lr", "3e-3", "--batch-size", "8", "--peft", "none",
                 "--quiet", "train.warmup_ratio=0", "train.report=false", "data.max_length=1024",
                 "data.eval_fraction=0"]) == 0
    general = write_jsonl(root / "general.jsonl", [{"prompt": f"Review {t}.", "completion": s}
                                                   for t, s in zip(TITLES, SHORT)])
    return {"root": root, "taxonomy": taxonomy, "teacher": root / "teacher", "general": general}


def synth_argv(lab, output: Path, *extra: str) -> list[str]:
    return ["synth", "--teacher", str(lab["teacher"]), "--taxonomy", str(lab["taxonomy"]), "--output", str(output),
            "--per-seed", "3", "--questions-per-prompt", "3", "--batch-size", "2", "--max-new-tokens", "40",
            "--chunk-words", "40", "--quiet", *extra]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_counts_add_up(summary: dict) -> None:
    for name, counts in [*summary["leaves"].items(), ("total", summary["total"])]:
        assert counts["generated"] == counts["kept"] + sum(counts[k] for k in FILTER_KEYS), (name, counts)


def test_real_teacher_rows_in_the_documented_format_and_sft_trains_on_them(lab, tmp_path, capsys):
    output = tmp_path / "synth.jsonl"
    assert main(synth_argv(lab, output)) == 0
    table = capsys.readouterr().out
    rows = read_rows(output)
    summary = json.loads((tmp_path / "synth.summary.json").read_text())
    assert_counts_add_up(summary)
    assert set(summary["leaves"]) == {"skills/films", "knowledge/cinema"}
    # 5 and 4 seeds x 3 per seed / 3 per prompt = 5 and 4 prompts of 3 questions each
    assert summary["total"]["generated"] >= 9 and summary["total"]["kept"] == len(rows) > 0
    for name, counts in summary["leaves"].items():
        assert counts["kept"] == sum(r["leaf"] == name for r in rows)
        assert name in table
    assert "total" in table and "duplicate" in table
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert user["content"].strip() and assistant["content"].strip()
        assert row["leaf"] in row["id"] and 0 <= row["rouge_l"] <= 0.7
        seeds = 5 if row["leaf"] == "skills/films" else 4
        assert len(row["seed_ids"]) == 3 and all(0 <= i < seeds for i in row["seed_ids"])
        assert ("chunk" in row) == (row["leaf"] == "knowledge/cinema")
        assert "judge_score" not in row

    # the replay mixture of the README: synthetic rows plus 0.3 of a general dataset
    run = tmp_path / "student"
    assert main(["sft", "--model", str(lab["root"] / "base"), "--data", str(output), "--data", f"{lab['general']}:0.3",
                 "--output", str(run), "--max-steps", "2", "--batch-size", "4", "--quiet", "train.report=false",
                 "data.eval_fraction=0", "data.max_length=256"]) == 0
    err = capsys.readouterr().err
    assert f"{output} [messages]: {len(rows)} rows, {len(rows)} kept" in err
    assert "general.jsonl [prompt_completion]" in err and "error" not in err
    assert (run / "final" / "adapter_config.json").is_file()


class ScriptedTeacher:
    """A teacher whose replies are written out: planted duplicates, bad lines and bad answers."""

    template = "chat"
    calls = 0
    fail_at: int | None = None

    def __init__(self, path, generation):
        self.generation = generation

    def render(self, request: str, reply_prefix: str) -> str:
        return request

    def complete(self, prompts: list[str], seed: int) -> list[str]:
        type(self).calls += 1
        if type(self).fail_at is not None and type(self).calls >= type(self).fail_at:
            raise RuntimeError("teacher gone")
        return [self.reply(p) for p in prompts]

    def reply(self, prompt: str) -> str:
        if "new questions" in prompt:
            seed_question = prompt.split("Example questions:\nQ: ")[1].split("\n")[0]
            draw = prompt.count("e")  # differs between draws: fresh questions per prompt
            if "unparseable" in prompt:
                return "I cannot think of any."
            return "\n".join([
                f"Q: {seed_question}",                                     # a seed again: duplicate
                f"1. Q: How does film number {draw} end for the hero?",    # new
                f"2. Q: How does film number {draw} end for the hero",     # near-duplicate of the line above
                "Q: ?",                                                    # empty
                f"Question: Who scored the music of picture {draw * 7}?",  # new (answer copies it)
            ])
        question = prompt.rsplit("Q: ", 1)[1]
        if "music" in question:
            return f"A: {question}"
        return "A: It ends well."


def test_filters_drop_planted_duplicates_and_bad_rows_and_count_each(lab, tmp_path, monkeypatch, capsys):
    taxonomy = tmp_path / "taxonomy"
    write_leaf(taxonomy, "skills/films", "Ask whether a film is worth watching.", film_seeds(3))
    write_leaf(taxonomy, "skills/mute", "unparseable", film_seeds(3, 5))
    monkeypatch.setattr(synth, "Teacher", ScriptedTeacher)
    monkeypatch.setattr(ScriptedTeacher, "length", lambda self, text: len(text.split()), raising=False)
    output = tmp_path / "out.jsonl"
    assert main(["synth", "--teacher", "scripted", "--taxonomy", str(taxonomy), "--output", str(output),
                 "--per-seed", "1", "--questions-per-prompt", "5", "--max-length", "60", "--quiet"]) == 0
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    films, mute = summary["leaves"]["skills/films"], summary["leaves"]["skills/mute"]
    # 3 seeds x 1 per seed / 5 per prompt: one prompt per leaf
    assert films == {"generated": 5, "kept": 1, "unparseable": 0, "empty": 1, "too_long": 0, "duplicate": 2,
                     "copies_question": 1, "judge_low": 0}, films
    assert mute == {"generated": 1, "kept": 0, "unparseable": 1, **{k: 0 for k in FILTER_KEYS[1:]}}, mute
    assert_counts_add_up(summary)
    rows = read_rows(output)
    assert len(rows) == 1
    question = rows[0]["messages"][0]["content"]
    assert question.startswith("How does film number") and question.endswith("hero?")
    assert rows[0]["messages"][1]["content"] == "It ends well."
    assert rows[0]["id"] == "skills/films/0/1" and rows[0]["rouge_l"] < 0.7
    assert not any(s["question"] == question for s in film_seeds(3))


def test_too_long_rows_are_dropped(lab, tmp_path, monkeypatch):
    taxonomy = tmp_path / "taxonomy"
    write_leaf(taxonomy, "skills/films", "Ask whether a film is worth watching.", film_seeds(3))
    monkeypatch.setattr(synth, "Teacher", ScriptedTeacher)
    monkeypatch.setattr(ScriptedTeacher, "length", lambda self, text: len(text.split()), raising=False)
    monkeypatch.setattr(ScriptedTeacher, "reply", lambda self, p: (
        "Q: How does film number 1 end?" if "new questions" in p else "It ends well. " * 40))
    output = tmp_path / "out.jsonl"
    assert main(["synth", "--teacher", "scripted", "--taxonomy", str(taxonomy), "--output", str(output),
                 "--per-seed", "1", "--max-length", "60", "--quiet"]) == 0
    counts = json.loads((tmp_path / "out.summary.json").read_text())["total"]
    assert counts["generated"] == 1 and counts["too_long"] == 1 and counts["kept"] == 0
    assert output.read_text() == ""


def test_resume_after_an_error_mid_run_writes_the_rows_of_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    taxonomy = tmp_path / "taxonomy"
    write_leaf(taxonomy, "skills/films", "Ask whether a film is worth watching.", film_seeds(6))
    monkeypatch.setattr(synth, "Teacher", ScriptedTeacher)
    monkeypatch.setattr(ScriptedTeacher, "length", lambda self, text: len(text.split()), raising=False)
    argv = ["synth", "--teacher", "scripted", "--taxonomy", str(taxonomy), "--per-seed", "2",
            "--questions-per-prompt", "2", "--batch-size", "1", "--rouge-threshold", "1", "--quiet"]
    assert main([*argv, "--output", str(tmp_path / "straight.jsonl")]) == 0
    straight = (tmp_path / "straight.jsonl").read_text()
    interrupted = tmp_path / "cut.jsonl"
    monkeypatch.setattr(ScriptedTeacher, "fail_at", ScriptedTeacher.calls + 5)  # mid-way through batch 3
    assert main([*argv, "--output", str(interrupted)]) == 1
    assert 0 < len(interrupted.read_text()) < len(straight)
    assert main([*argv, "--output", str(interrupted)]) == 2
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(ScriptedTeacher, "fail_at", None)
    assert main([*argv, "--output", str(interrupted), "--resume"]) == 0
    assert interrupted.read_text() == straight and len(straight.splitlines()) == 12


def start(argv: list[str], log: Path, env: dict[str, str]):
    process = CONTEXT.Process(target=run_cli, args=(argv, env, str(log)))
    process.start()
    return process


def test_kill_mid_batch_and_resume_gives_no_duplicates_and_no_lost_rows(lab, tmp_path, capsys):
    straight = tmp_path / "straight.jsonl"
    process = start(synth_argv(lab, straight), tmp_path / "straight.log", {})
    process.join(120)
    assert process.exitcode == 0, (tmp_path / "straight.log").read_text()
    expected = read_rows(straight)

    killed = tmp_path / "killed.jsonl"
    marker = tmp_path / "paused"
    env = {"TUNELAB_TEST_PAUSE_AT": "synth-rows:3", "TUNELAB_TEST_PAUSE_FILE": str(marker)}
    process = start(synth_argv(lab, killed), tmp_path / "killed.log", env)
    deadline = time.time() + 120
    while not marker.exists():
        assert process.is_alive(), (tmp_path / "killed.log").read_text()
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)  # half of batch 3's rows written, the batch not recorded
    process.join(30)
    assert process.exitcode == -signal.SIGKILL
    assert not killed.read_text().endswith("\n")  # a torn last line

    assert main(synth_argv(lab, killed, "--resume", "--seed", "1")) == 2  # another seed: another run
    assert "generation.seed differ" in capsys.readouterr().err
    process = start(synth_argv(lab, killed, "--resume"), tmp_path / "resumed.log", {})
    process.join(120)
    assert process.exitcode == 0, (tmp_path / "resumed.log").read_text()
    assert "partial line" in (tmp_path / "resumed.log").read_text()
    rows = read_rows(killed)
    assert rows == expected and len({r["id"] for r in rows}) == len(rows)
    summary = json.loads((tmp_path / "killed.summary.json").read_text())
    assert summary["total"] == json.loads((tmp_path / "straight.summary.json").read_text())["total"]


@pytest.mark.parametrize("case, expected", [
    ("missing_answer", "skills/films/qna.yaml: seed_examples[2]: missing field 'answer'"),
    ("too_few", "skills/films/qna.yaml: seed_examples: 2 examples, at least 3 are needed"),
    ("no_task", "skills/films/qna.yaml: missing field 'task_description'"),
    ("no_document", "knowledge/cinema/qna.yaml: document[0]: "),
    ("bad_yaml", "skills/films/qna.yaml: line 2, column 24: not valid YAML (mapping values are not allowed here)"),
])
def test_taxonomy_errors_are_located_and_nothing_is_written(tmp_path, capsys, case, expected):
    taxonomy = make_taxonomy(tmp_path / "taxonomy")
    films = taxonomy / "skills/films/qna.yaml"
    data = yaml.safe_load(films.read_text())
    if case == "missing_answer":
        del data["seed_examples"][2]["answer"]
    elif case == "too_few":
        data["seed_examples"] = data["seed_examples"][:2]
    elif case == "no_task":
        del data["task_description"]
    films.write_text(yaml.safe_dump(data))
    if case == "no_document":
        (taxonomy / "knowledge/cinema/notes.md").unlink()
    if case == "bad_yaml":
        films.write_text("created_by: tests\ntask_description: films: worth it\n")
    output = tmp_path / "out.jsonl"
    # the teacher does not exist: the taxonomy is checked before any model is loaded
    assert main(["synth", "--teacher", str(tmp_path / "nowhere"), "--taxonomy", str(taxonomy), "--output",
                 str(output)]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.startswith("tunelab synth: error: ") and len(err.strip().splitlines()) == 1
    if case == "no_document":
        assert "notes.md does not exist" in err
    assert not list(tmp_path.glob("out*"))


def test_existing_output_needs_resume_or_overwrite(tmp_path, capsys):
    taxonomy = make_taxonomy(tmp_path / "taxonomy")
    output = tmp_path / "out.jsonl"
    output.write_text('{"keep": 1}\n')
    assert main(["synth", "--teacher", str(tmp_path / "nowhere"), "--taxonomy", str(taxonomy), "--output",
                 str(output)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--resume" in err and "--overwrite" in err
    assert output.read_text() == '{"keep": 1}\n'


def test_question_parsing_and_document_chunks():
    reply = "Here you go:\n1. Q: First one?\nQ2: Second one?\n- Question: Third?\nnot a question\nq: fourth"
    assert synth.parse_questions(reply) == ["First one?", "Second one?", "Third?", "fourth"]
    assert synth.clean_answer("A: It is.\nQ: next?\nA: no") == "It is."
    text = "one two three\n\nfour five\n\n" + " ".join(f"w{i}" for i in range(7))
    assert split_chunks(text, 5) == ["one two three\n\nfour five", "w0 w1 w2 w3 w4", "w5 w6"]


def test_judge_scores_rows_and_drops_those_below_the_threshold(lab, tmp_path, monkeypatch):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"Is {t} worth watching?", "chosen": s,
                                                    "rejected": "No."} for t, s in zip(TITLES, SHORT)])
    assert main(["rm", "--model", str(lab["root"] / "base"), "--data", str(prefs), "--output", str(tmp_path / "rm"),
                 "--max-steps", "2", "--batch-size", "8", "--quiet", "train.report=false",
                 "data.eval_fraction=0"]) == 0
    taxonomy = tmp_path / "taxonomy"
    write_leaf(taxonomy, "skills/films", "Ask whether a film is worth watching.", film_seeds(4))
    monkeypatch.setattr(synth, "Teacher", ScriptedTeacher)
    monkeypatch.setattr(ScriptedTeacher, "length", lambda self, text: len(text.split()), raising=False)
    argv = ["synth", "--teacher", "scripted", "--taxonomy", str(taxonomy), "--per-seed", "2",
            "--questions-per-prompt", "2", "--rouge-threshold", "1", "--judge", str(tmp_path / "rm"), "--quiet"]
    assert main([*argv, "--output", str(tmp_path / "all.jsonl")]) == 0
    scored = read_rows(tmp_path / "all.jsonl")
    scores = sorted(r["judge_score"] for r in scored)
    assert len(scores) == 8 and len(set(scores)) > 1  # the seed question and a new one per prompt, all scored
    threshold = (scores[3] + scores[4]) / 2
    assert main([*argv, "--judge-threshold", str(threshold), "--output", str(tmp_path / "judged.jsonl")]) == 0
    kept = read_rows(tmp_path / "judged.jsonl")
    assert len(kept) == 4 and all(r["judge_score"] >= threshold for r in kept)
    counts = json.loads((tmp_path / "judged.summary.json").read_text())["total"]
    assert counts["judge_low"] == 4 and counts["kept"] == 4 and counts["generated"] == 8


def test_prompts_carry_the_task_the_chunk_and_seed_context():
    from tunelab.taxonomy import Leaf, Seed

    seeds = [Seed(0, "Is Quiet Cairo good?", "Yes.", context="A film review."), Seed(1, "Is Dune long?", "Very.")]
    leaf = Leaf("knowledge/films", Path("qna.yaml"), "Ask about films.", seeds, chunks=["Dune runs 155 minutes."])
    asking = synth.question_prompt(leaf, seeds, leaf.chunks[0], 4)
    assert "Task: Ask about films." in asking and "Document:\nDune runs 155 minutes." in asking
    assert "Q: Is Quiet Cairo good?\nQ: Is Dune long?" in asking and "Write 4 new questions" in asking
    answering = synth.answer_prompt(leaf, seeds, leaf.chunks[0], "How long is Dune?")
    assert "Context: A film review.\nQ: Is Quiet Cairo good?\nA: Yes." in answering
    assert "\n\nQ: Is Dune long?\nA: Very." in answering and answering.endswith("Q: How long is Dune?")

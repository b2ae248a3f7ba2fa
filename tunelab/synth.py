"""`tunelab synth`: synthetic instruction data from a teacher model, driven by a taxonomy of seed examples.

For each leaf (see `tunelab.taxonomy`), in two stages as Self-Instruct (Wang et al., 2023) and InstructLab do:

1. questions: a few-shot prompt of `seeds_per_prompt` seed questions drawn at random (and, for knowledge, one
   document chunk) asks the teacher for `questions_per_prompt` new questions, one per line as `Q: ...`;
2. answers: each question that survives the question filters gets a prompt of its own (the same seeds as solved
   examples, the same chunk), and the teacher's reply is its answer.

Filters, each counted per leaf: `unparseable` (a stage-1 reply with no `Q:` line: counted once), `empty`,
`too_long` (question + answer over `max_length` teacher tokens), `duplicate` (ROUGE-L F1 of the question above
`rouge_threshold` against a seed question, a kept question or an earlier question of its batch), `copies_question`
(ROUGE-L F1 of the answer against its question at least COPY_THRESHOLD), `judge_low` (a reward model's score
under `judge_threshold`). generated = kept + the sum of the drops.

Crash safety: the rows of a batch are appended to the output in one write and fsynced, then a record of the batch
(its ids and counts) is appended to `<output>.progress`. Resuming keeps the rows of recorded batches only and
redoes the rest; every batch samples with a seed made from the run's seed, the leaf and the batch number, so a
resumed run writes the rows an uninterrupted one writes. Pause points (see `tunelab.pause`): `synth-rows` (half
of a batch's rows written), `synth-batch` (rows written, batch not yet recorded).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunelab import jsonlog, pause
from tunelab.checkpoint import atomic_write_text
from tunelab.config import ConfigError
from tunelab.data.load import DataError
from tunelab.generation import GenerationOptions, resolve_model_dir
from tunelab.jsonlog import read_jsonl
from tunelab.safety import check_output_file, output_error, terminal_safe
from tunelab.taxonomy import Leaf, Seed, read_taxonomy

FILTERS = ("unparseable", "empty", "too_long", "duplicate", "copies_question", "judge_low")
COPY_THRESHOLD = 0.8
FORMATS = ("messages", "prompt_completion")
_QUESTION_LINE = re.compile(r"^\s*(?:[-*]\s*)?(?:\d+\s*[.):]\s*)?(?:Q|Question)\s*\d*\s*[:.)]\s*(.*)$", re.I)
_ANSWER_PREFIX = re.compile(r"^\s*(?:A|Answer)\s*[:.)]\s*", re.I)


@dataclass
class SynthOptions:
    """What `tunelab synth` generates and keeps; `generation` holds the teacher's decoding parameters."""

    per_seed: int = 5
    questions_per_prompt: int = 5
    seeds_per_prompt: int = 3
    format: str = "messages"
    max_length: int = 512
    rouge_threshold: float = 0.7
    chunk_words: int = 200
    judge: str | None = None
    judge_threshold: float | None = None
    documents: str | None = None
    generation: GenerationOptions = field(default_factory=lambda: GenerationOptions(temperature=0.7))


def parse_questions(text: str) -> list[str]:
    """The questions of a stage-1 reply: the text after `Q:` (or `1. Q:`, `Question 2:`, ...) on each line."""
    questions = []
    for line in text.splitlines():
        match = _QUESTION_LINE.match(line)
        if match:
            questions.append(match.group(1).strip())
    return questions


def clean_answer(text: str) -> str:
    """A stage-2 reply as an answer: without a leading `A:`, cut where the teacher starts a next `Q:` line."""
    lines = text.strip().splitlines()
    for i, line in enumerate(lines):
        if i and _QUESTION_LINE.match(line):
            lines = lines[:i]
            break
    return _ANSWER_PREFIX.sub("", "\n".join(lines), count=1).strip()


def question_prompt(leaf: Leaf, seeds: list[Seed], chunk: str | None, count: int) -> str:
    """The stage-1 request: the task, the document chunk, the drawn seed questions, and the ask."""
    parts = [f"Task: {leaf.task_description}"]
    if chunk is not None:
        parts.append(f"Document:\n{chunk}")
    parts.append("Example questions:\n" + "\n".join(f"Q: {_one_line(s.question)}" for s in seeds))
    about = " about the document" if chunk is not None else ""
    parts.append(f"Write {count} new questions for this task{about}, different from the examples, each on one "
                 "line starting with \"Q:\".")
    return "\n\n".join(parts)


def answer_prompt(leaf: Leaf, seeds: list[Seed], chunk: str | None, question: str) -> str:
    """The stage-2 request: the task, the chunk, the seeds as solved examples, and the question to answer."""
    parts = [f"Task: {leaf.task_description}"]
    if chunk is not None:
        parts.append(f"Document:\n{chunk}")
    parts.append("Examples:\n" + "\n\n".join(f"{f'Context: {s.context}' + chr(10) if s.context else ''}"
                                               f"Q: {s.question}\nA: {s.answer}" for s in seeds))
    parts.append(f"Answer this question{' using the document' if chunk is not None else ''}.\n\nQ: {question}")
    return "\n\n".join(parts)


def _one_line(text: str) -> str:
    return " ".join(text.split())


class Teacher:
    """The teacher model: loaded once (a model, adapter or run directory, or a GGUF file), on the GPU when
    there is one; prompts go through its chat template when it has one."""

    def __init__(self, path: str, generation: GenerationOptions):
        import torch

        from tunelab.data.templates import resolve_chat_template
        from tunelab.modeling import load_for_inference

        self.model, self.tokenizer = load_for_inference(resolve_model_dir(path))
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.template = resolve_chat_template(self.tokenizer, None)
        self.generation = generation

    def render(self, request: str, reply_prefix: str) -> str:
        """The text the teacher continues: `request` as a user turn, or as plain text followed by
        `reply_prefix` (`Q:`, `A:`) for a model without a chat template."""
        if self.template:
            from tunelab.data.templates import render_chat

            return render_chat(self.tokenizer, self.template, [{"role": "user", "content": request}], True)
        return f"{request}\n\n{reply_prefix}"

    def complete(self, prompts: list[str], seed: int) -> list[str]:
        """One reply per rendered prompt, sampled with `seed`."""
        from tunelab.rollout import generate

        if not prompts:
            return []
        options = {**asdict(self.generation), "seed": seed}
        return generate(self.model, self.tokenizer, prompts, **options)

    def length(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


class Judge:
    """A reward model (a `tunelab rm` run) that scores question + answer."""

    def __init__(self, path: str, batch_size: int):
        from tunelab.rewards import RewardScorer

        self.scorer = RewardScorer(path, batch_size=batch_size)

    def score(self, questions: list[str], answers: list[str]) -> list[float]:
        if not questions:
            return []
        chat = bool(getattr(self.scorer.tokenizer, "chat_template", None))
        prompts = [[{"role": "user", "content": q}] if chat else q for q in questions]
        return self.scorer.score(prompts, answers)


def unit_seed(seed: int, leaf: str, batch: int, stage: str) -> int:
    """The sampling seed of one batch and stage: the same in a fresh and in a resumed run."""
    return int(hashlib.sha256(f"{seed}:{leaf}:{batch}:{stage}".encode()).hexdigest()[:8], 16)


def leaf_draws(leaf: Leaf, options: SynthOptions) -> int:
    """How many stage-1 prompts a leaf gets: enough for `per_seed` new questions per seed example."""
    return math.ceil(options.per_seed * len(leaf.seeds) / options.questions_per_prompt)


def draw(leaf: Leaf, index: int, options: SynthOptions) -> tuple[list[Seed], int | None]:
    """The seed examples (and document chunk) of a leaf's `index`-th prompt, drawn reproducibly."""
    rng = random.Random(f"{options.generation.seed}:{leaf.name}:{index}")
    seeds = rng.sample(leaf.seeds, min(options.seeds_per_prompt, len(leaf.seeds)))
    return seeds, (rng.randrange(len(leaf.chunks)) if leaf.chunks else None)


class RougeL:
    """ROUGE-L F1 (rouge-score, as tunelab eval computes it, without stemming as Self-Instruct does)."""

    def __init__(self):
        from rouge_score import rouge_scorer

        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    def __call__(self, a: str, b: str) -> float:
        return self.scorer.score(a, b)["rougeL"].fmeasure

    def most_similar(self, text: str, others: list[str]) -> float:
        return max((self(other, text) for other in others), default=0.0)


def new_counts() -> dict[str, int]:
    return {"generated": 0, "kept": 0, **{name: 0 for name in FILTERS}}


def run_batch(leaf: Leaf, batch: int, teacher: Teacher, judge: Judge | None, options: SynthOptions,
              known: list[str], rouge: RougeL) -> tuple[list[dict], dict[str, int]]:
    """Generate, filter and return one batch's rows and counts; `known` holds the seed and kept questions."""
    counts = new_counts()
    size = options.generation.batch_size
    first, last = batch * size, min((batch + 1) * size, leaf_draws(leaf, options))
    draws = {index: draw(leaf, index, options) for index in range(first, last)}
    chunk_of = {index: leaf.chunks[c] if c is not None else None for index, (_, c) in draws.items()}
    requests = [teacher.render(question_prompt(leaf, seeds, chunk_of[i], options.questions_per_prompt), "Q:")
                for i, (seeds, _) in draws.items()]
    replies = teacher.complete(requests, unit_seed(options.generation.seed, leaf.name, batch, "questions"))
    candidates = []  # (draw, k, question, rouge_l)
    batch_questions: list[str] = []
    for index, reply in zip(draws, replies):
        if not teacher.template:
            reply = "Q:" + reply  # the plain prompt ends in the first `Q:`
        questions = parse_questions(reply)[:options.questions_per_prompt]
        counts["generated"] += max(1, len(questions))
        if not questions:
            counts["unparseable"] += 1
        for k, question in enumerate(questions):
            if not re.search(r"\w", question):
                counts["empty"] += 1
                continue
            similarity = rouge.most_similar(question, known + batch_questions)
            if similarity > options.rouge_threshold:
                counts["duplicate"] += 1
                continue
            batch_questions.append(question)
            candidates.append((index, k, question, similarity))
    requests = [teacher.render(answer_prompt(leaf, draws[i][0], chunk_of[i], q), "A:") for i, _, q, _ in candidates]
    answers = [clean_answer(a) for a in teacher.complete(requests, unit_seed(options.generation.seed, leaf.name,
                                                                               batch, "answers"))]
    passed = []
    for candidate, answer in zip(candidates, answers):
        question = candidate[2]
        if not answer:
            counts["empty"] += 1
        elif teacher.length(question) + teacher.length(answer) > options.max_length:
            counts["too_long"] += 1
        elif rouge(question, answer) >= COPY_THRESHOLD:
            counts["copies_question"] += 1
        else:
            passed.append((*candidate, answer))
    scores = judge.score([p[2] for p in passed], [p[4] for p in passed]) if judge else [None] * len(passed)
    rows = []
    for (index, k, question, similarity, answer), score in zip(passed, scores):
        if score is not None and options.judge_threshold is not None and score < options.judge_threshold:
            counts["judge_low"] += 1
            continue
        rows.append(make_row(leaf, index, k, question, answer, draws[index], similarity, score, options.format))
    counts["kept"] = len(rows)
    return rows, counts


def make_row(leaf: Leaf, index: int, k: int, question: str, answer: str, drawn: tuple[list[Seed], int | None],
             similarity: float, score: float | None, fmt: str) -> dict:
    """An output row in `fmt`, with its id, leaf, seed ids, chunk, ROUGE-L and judge score."""
    seeds, chunk = drawn
    if fmt == "messages":
        row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    else:
        row = {"prompt": question, "completion": answer}
    row.update(id=f"{leaf.name}/{index}/{k}", leaf=leaf.name, seed_ids=[s.index for s in seeds],
               rouge_l=round(similarity, 4))
    if chunk is not None:
        row["chunk"] = chunk
    if score is not None:
        row["judge_score"] = score
    return row


def row_question(row: dict) -> str:
    return row["messages"][0]["content"] if "messages" in row else row["prompt"]


def append_lines(path: Path, records: list[dict], pause_point: str | None = None) -> None:
    """Append records as lines in one write, flushed and fsynced before returning."""
    try:
        jsonlog.append_lines(path, records, pause_point, sync=True)
    except OSError as exc:
        raise output_error(path, exc) from exc


def settings(leaves: list[Leaf], teacher: str, options: SynthOptions) -> dict:
    """What makes a run's rows: compared on --resume, so that a resumed run continues the same one."""
    content = [[leaf.name, leaf.task_description, [asdict(s) for s in leaf.seeds], leaf.chunks] for leaf in leaves]
    values = {**asdict(options), "teacher": teacher,
              "taxonomy": hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]}
    values.pop("documents")
    values.update({f"generation.{k}": v for k, v in values.pop("generation").items()})
    return values


def paths_of(output: str | Path) -> tuple[Path, Path, Path]:
    """(rows, progress record, summary) files of an output."""
    output = Path(output)
    return output, Path(f"{output}.progress"), output.with_suffix(".summary.json")


def _restore(output: Path, progress: Path, expected: dict) -> tuple[dict, list[dict]]:
    """The recorded batches {(leaf, batch): counts} and the rows of those batches, from a run to resume; the
    output is rewritten without rows of an unrecorded batch (a run killed while writing it)."""
    if not progress.is_file():
        raise ConfigError(f"--resume: {progress} is missing, so what {output} holds cannot be continued; pass "
                          "--overwrite to start over")
    records = read_jsonl(progress)
    if not records or "settings" not in records[0]:
        raise DataError(f"{progress}: does not start with the run's settings; pass --overwrite to start over")
    before = records[0]["settings"]
    changed = sorted(k for k in set(before) | set(expected) if before.get(k) != expected.get(k))
    if changed:
        raise ConfigError(f"--resume: {', '.join(changed)} differ from the run in {output} (same teacher, "
                          "taxonomy, seed and options are needed to continue it); pass --overwrite to start over")
    done = {(r["leaf"], r["batch"]): r for r in records[1:]}
    recorded = {row_id for r in done.values() for row_id in r["ids"]}
    rows = read_jsonl(output) if output.is_file() else []
    kept, seen = [], set()
    for row in rows:
        if row.get("id") in recorded and row["id"] not in seen:
            kept.append(row)
            seen.add(row["id"])
    if recorded - seen:
        raise DataError(f"{output}: rows recorded in {progress} are missing ({len(recorded - seen)}, e.g. "
                        f"{sorted(recorded - seen)[0]}); the file was changed: pass --overwrite to start over")
    if len(kept) != len(rows) or not output.is_file():
        atomic_write_text(output, "".join(json.dumps(r) + "\n" for r in kept))
    return done, kept


def synthesize(teacher_path: str, taxonomy: str, output: str, options: SynthOptions, resume: bool = False,
               overwrite: bool = False, quiet: bool = False) -> dict:
    """Run `tunelab synth`; returns the summary ({leaf: counts}, totals, seconds, rows per second of this
    invocation) also written next to the output."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite do not go together: continue the output, or start over")
    if options.format not in FORMATS:
        raise ConfigError(f"--format {options.format}: expected one of {', '.join(FORMATS)}")
    leaves = read_taxonomy(taxonomy, options.documents, options.chunk_words)
    rows_file, progress, summary_file = paths_of(output)
    check_output_file(rows_file)
    expected = settings(leaves, teacher_path, options)
    exists = rows_file.exists() or progress.exists()
    if exists and not resume and not overwrite:
        raise ConfigError(f"--output {rows_file} already exists; pass --resume to continue it or --overwrite to "
                          "start over")
    done, kept = _restore(rows_file, progress, expected) if resume and exists else ({}, [])
    teacher = Teacher(teacher_path, options.generation)
    judge = Judge(options.judge, options.generation.batch_size) if options.judge else None
    if not done:
        atomic_write_text(rows_file, "")
        atomic_write_text(progress, json.dumps({"settings": expected}) + "\n")
    summary = run_leaves(leaves, teacher, judge, options, done, kept, rows_file, progress, quiet)
    atomic_write_text(summary_file, json.dumps(summary, indent=2) + "\n")
    return summary


def run_leaves(leaves: list[Leaf], teacher: Teacher, judge: Judge | None, options: SynthOptions, done: dict,
               kept: list[dict], rows_file: Path, progress: Path, quiet: bool) -> dict:
    """Every batch of every leaf not in `done`, appended as it is made; the summary of the whole run."""
    rouge, size = RougeL(), options.generation.batch_size
    plan = [(leaf, b) for leaf in leaves for b in range(math.ceil(leaf_draws(leaf, options) / size))]
    bar = None
    if not quiet and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(leaf_draws(leaf, options) for leaf in leaves) * options.questions_per_prompt,
                   desc="synth", unit="row", dynamic_ncols=True)
    start, made, new_rows = time.time(), 0, 0
    counts = {leaf.name: new_counts() for leaf in leaves}
    known = {leaf.name: [s.question for s in leaf.seeds] for leaf in leaves}
    for row in kept:
        known[row["leaf"]].append(row_question(row))
    for number, (leaf, batch) in enumerate(plan):
        drawn = min(size, leaf_draws(leaf, options) - batch * size) * options.questions_per_prompt
        if (leaf.name, batch) in done:
            batch_counts = done[(leaf.name, batch)]["counts"]
        else:
            if bar is not None:
                bar.set_description(f"synth {terminal_safe(leaf.name)} ({leaves.index(leaf) + 1}/{len(leaves)})")
            rows, batch_counts = run_batch(leaf, batch, teacher, judge, options, known[leaf.name], rouge)
            append_lines(rows_file, rows, pause_point="synth-rows")
            pause.at("synth-batch")
            append_lines(progress, [{"leaf": leaf.name, "batch": batch, "ids": [r["id"] for r in rows],
                                     "counts": batch_counts}])
            known[leaf.name] += [row_question(r) for r in rows]
            made += batch_counts["generated"]
            new_rows += len(rows)
        for key, value in batch_counts.items():
            counts[leaf.name][key] += value
        if bar is not None:
            bar.update(drawn)
            bar.set_postfix(kept=sum(c["kept"] for c in counts.values()), refresh=False)
        last_of_leaf = number + 1 == len(plan) or plan[number + 1][0] is not leaf
        if last_of_leaf and bar is None and not quiet:
            c = counts[leaf.name]
            print(f"synth: {terminal_safe(leaf.name)}: {c['generated']} generated, {c['kept']} kept",
                  file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
    seconds = time.time() - start
    total = new_counts()
    for leaf_counts in counts.values():
        for key, value in leaf_counts.items():
            total[key] += value
    return {"leaves": counts, "total": total, "seconds": round(seconds, 3),
            "generated_per_s": round(made / seconds, 3) if seconds > 0 else None,
            "kept_per_s": round(new_rows / seconds, 3) if seconds > 0 else None}


def summary_table(summary: dict) -> str:
    """The per-leaf table: generated, kept and dropped by each filter, with a total line."""
    columns = ["generated", "kept", *FILTERS]
    rows = [(terminal_safe(name), c) for name, c in summary["leaves"].items()] + [("total", summary["total"])]
    width = max(len("leaf"), *(len(name) for name, _ in rows))
    lines = [f"{'leaf':<{width}}  " + "  ".join(f"{c:>{max(len(c), 5)}}" for c in columns)]
    for name, c in rows:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{c[col]:>{max(len(col), 5)}}" for col in columns))
    return "\n".join(lines)

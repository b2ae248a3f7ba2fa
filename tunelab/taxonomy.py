"""A taxonomy for `tunelab synth`: a folder tree whose leaves each hold a `qna.yaml` of seed examples.

A leaf is a skill (seed questions and answers on their own) or knowledge (the same, plus `document`: local
Markdown or text files, split into chunks that are given to the teacher as context). Every file is read and
checked before any model is loaded; a problem is a DataError that names the file, the seed example and the
field, e.g. `taxonomy/skills/haiku/qna.yaml: seed_examples[2]: missing field 'answer'`.

    task_description: Write a haiku about the given topic.   # required
    created_by: alice                                        # optional
    document: [docs/volcanoes.md]                            # knowledge only: paths relative to this file
    seed_examples:                                           # at least MIN_SEEDS
      - question: Write a haiku about autumn rain.
        answer: "..."
        context: "..."                                       # optional
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunelab.data.load import DataError

MIN_SEEDS = 3
LEAF_FILE = "qna.yaml"
DOCUMENT_SUFFIXES = (".md", ".markdown", ".txt", ".text", ".rst")


@dataclass
class Seed:
    """One seed example of a leaf; `index` is its place in the leaf's seed_examples list."""

    index: int
    question: str
    answer: str
    context: str | None = None


@dataclass
class Leaf:
    """A taxonomy leaf: its name (folder relative to the taxonomy root, with '/'), seeds and document chunks."""

    name: str
    path: Path
    task_description: str
    seeds: list[Seed]
    chunks: list[str] = field(default_factory=list)
    created_by: str | None = None

    @property
    def kind(self) -> str:
        return "knowledge" if self.chunks else "skill"


def read_taxonomy(root: str | Path, documents: str | Path | None = None, chunk_words: int = 200) -> list[Leaf]:
    """Every leaf under `root` (each folder holding a qna.yaml), in path order, validated.

    Document paths are relative to the qna.yaml, or to `documents` when it is given. Each document is split
    into chunks of at most `chunk_words` words at paragraph boundaries (a longer paragraph is cut by words).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--taxonomy {root}: not a folder (expected a folder tree of {LEAF_FILE} files)")
    if documents is not None and not Path(documents).is_dir():
        raise DataError(f"--documents {documents}: not a folder")
    files = sorted(root.rglob(LEAF_FILE))
    if not files:
        raise DataError(f"--taxonomy {root}: no {LEAF_FILE} found in it or below it")
    return [read_leaf(path, root, documents, chunk_words) for path in files]


def read_leaf(path: Path, root: Path, documents: str | Path | None, chunk_words: int) -> Leaf:
    """One qna.yaml, checked field by field."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f": line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DataError(f"{path}{where}: not valid YAML ({problem})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping with task_description and seed_examples, found "
                        f"{_kind(data)}")
    task = _text(data, "task_description", str(path))
    created_by = data.get("created_by")
    if created_by is not None and not isinstance(created_by, str):
        raise DataError(f"{path}: created_by: expected text, found {_kind(created_by)}")
    seeds = _seeds(data, path)
    chunks = []
    for i, document in enumerate(_document_paths(data, path)):
        base = Path(documents) if documents is not None else path.parent
        chunks += _document_chunks(base / document, f"{path}: document[{i}]", chunk_words)
    name = path.parent.relative_to(root).as_posix()
    return Leaf(name=name if name != "." else root.name, path=path, task_description=task, seeds=seeds,
                chunks=chunks, created_by=created_by)


def _kind(value) -> str:
    return {dict: "a mapping", list: "a list", str: "text", type(None): "nothing"}.get(type(value),
                                                                                      type(value).__name__)


def _text(mapping: dict, key: str, where: str, optional: bool = False) -> str | None:
    if key not in mapping or mapping[key] is None:
        if optional:
            return None
        raise DataError(f"{where}: missing field '{key}'")
    value = mapping[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # YAML reads `answer: 42` as a number
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}': expected text, found {_kind(value)}")
    if not value.strip() and not optional:
        raise DataError(f"{where}: field '{key}' is empty")
    return value.strip()


def _seeds(data: dict, path: Path) -> list[Seed]:
    examples = data.get("seed_examples")
    if examples is None:
        raise DataError(f"{path}: missing field 'seed_examples' (a list of at least {MIN_SEEDS} examples with "
                        "question and answer)")
    if not isinstance(examples, list):
        raise DataError(f"{path}: seed_examples: expected a list, found {_kind(examples)}")
    seeds = []
    for i, example in enumerate(examples):
        where = f"{path}: seed_examples[{i}]"
        if not isinstance(example, dict):
            raise DataError(f"{where}: expected a mapping with question and answer, found {_kind(example)}")
        seeds.append(Seed(i, _text(example, "question", where), _text(example, "answer", where),
                          _text(example, "context", where, optional=True) or None))
    if len(seeds) < MIN_SEEDS:
        raise DataError(f"{path}: seed_examples: {len(seeds)} example{'s' if len(seeds) != 1 else ''}, at least "
                        f"{MIN_SEEDS} are needed")
    return seeds


def _document_paths(data: dict, path: Path) -> list[str]:
    documents = data.get("document")
    if documents is None:
        return []
    if isinstance(documents, str):
        documents = [documents]
    if not isinstance(documents, list) or not documents:
        raise DataError(f"{path}: document: expected a local file path or a list of them (Markdown or text, "
                        f"relative to the qna.yaml), found {_kind(documents)}")
    for i, document in enumerate(documents):
        if not isinstance(document, str) or not document.strip():
            raise DataError(f"{path}: document[{i}]: expected a file path, found {_kind(document)}")
    return documents


def _document_chunks(file: Path, where: str, chunk_words: int) -> list[str]:
    if not file.is_file():
        raise DataError(f"{where}: {file} does not exist" if not file.exists() else f"{where}: {file} is not a file")
    if file.suffix.lower() not in DOCUMENT_SUFFIXES:
        raise DataError(f"{where}: {file}: expected a Markdown or text file ({', '.join(DOCUMENT_SUFFIXES)})")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{where}: {file} is not UTF-8 text") from None
    chunks = split_chunks(text, chunk_words)
    if not chunks:
        raise DataError(f"{where}: {file} holds no text")
    return chunks


def split_chunks(text: str, chunk_words: int) -> list[str]:
    """`text` in chunks of at most `chunk_words` words: whole paragraphs (blank-line separated) packed
    together, a paragraph longer than that cut into pieces of `chunk_words` words."""
    pieces: list[list[str]] = []
    for paragraph in text.split("\n\n"):
        words = paragraph.split()
        pieces += [words[i:i + chunk_words] for i in range(0, len(words), chunk_words)]
    chunks: list[list[str]] = []  # each: the paragraphs (as text) of one chunk
    counts: list[int] = []
    for words in pieces:
        if chunks and counts[-1] + len(words) <= chunk_words:
            chunks[-1].append(" ".join(words))
            counts[-1] += len(words)
        else:
            chunks.append([" ".join(words)])
            counts.append(len(words))
    return ["\n\n".join(paragraphs) for paragraphs in chunks]

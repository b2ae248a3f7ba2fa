"""Generation for the labeling page, in a background thread: the pairs of the items being labeled first, then
the next few ahead, so the page has the next pair ready when a label is submitted.

Responses are sampled with tunelab's own generation (`tunelab.rollout.generate`), from models loaded as
`tunelab generate` loads them (a model folder, a LoRA adapter, a run directory's final/, a GGUF file).
One model gives two samples of the same prompt (in one batch); two models give one response each.
"""

from __future__ import annotations

import threading
import traceback
from dataclasses import asdict, dataclass

from tunelab.label.items import Item, Pair, Response
from tunelab.label.session import LabelSession


@dataclass
class LoadedModel:
    source: str
    model: object
    tokenizer: object


def source_names(paths: list[str]) -> list[str]:
    """The hidden source of each response: the model as given; two samples of one model are told apart."""
    if len(paths) == 1:
        return [f"{paths[0]} (sample 1)", f"{paths[0]} (sample 2)"]
    if paths[0] == paths[1]:
        return [f"{paths[0]} (1)", f"{paths[1]} (2)"]
    return list(paths)


def load_models(paths: list[str]) -> list[LoadedModel]:
    from tunelab.generation import resolve_model_dir
    from tunelab.modeling import load_for_inference

    names = source_names(paths) if len(paths) == 2 else [paths[0]]
    return [LoadedModel(name, *load_for_inference(resolve_model_dir(path))) for name, path in zip(names, paths)]


def make_pair(models: list[LoadedModel], item: Item, options) -> Pair:
    """Two responses to the item's prompt: two samples of one model, or one from each of two models."""
    from tunelab.rollout import generate

    settings = {k: v for k, v in asdict(options).items() if k != "batch_size"}
    if settings.get("seed") is not None:
        settings["seed"] += item.index  # reproducible per item, different across items
    if len(models) == 1:
        only = models[0]
        texts = generate(only.model, only.tokenizer, [item.inputs[0]] * 2, batch_size=2, **settings)
        names = source_names([only.source])
        return Pair(Response(texts[0], names[0]), Response(texts[1], names[1]))
    responses = []
    for loaded, text in zip(models, item.inputs):
        responses.append(Response(generate(loaded.model, loaded.tokenizer, [text], batch_size=1, **settings)[0],
                                  loaded.source))
    return Pair(*responses)


class PairWorker(threading.Thread):
    """Generates the pairs the session wants until the session closes; a failure is reported to the page."""

    def __init__(self, session: LabelSession, models: list[LoadedModel], options):
        super().__init__(name="tunelab-label-generation", daemon=True)
        self.session, self.models, self.options = session, models, options

    def run(self) -> None:
        while True:
            item = self.session.wanted()
            if item is None:
                return
            try:
                pair = make_pair(self.models, item, self.options)
            except Exception as exc:  # shown on the page; the server stays up for the labels already made
                traceback.print_exc()
                self.session.failed(f"generation failed on prompt {item.index + 1}: {type(exc).__name__}: {exc}")
                return
            self.session.prepared(item.key, pair)

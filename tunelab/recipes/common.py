"""Pieces every recipe shares: starting a run directory, batching tokenized rows, writing final/."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel

from tunelab.checkpoint import RunDir, atomic_dir, atomic_write_text
from tunelab.config import config_to_yaml
from tunelab.data.batching import epoch_batches, mixture_indices, pad_batch
from tunelab.data.templates import Rendered
from tunelab.modeling import save_pretrained


def log(text: str) -> None:
    """Status lines go to stderr, so stdout stays clean for results."""
    print(text, file=sys.stderr, flush=True)


def absolute_if_local(name_or_path: str) -> str:
    """Local model paths are stored absolute, so adapters and configs still resolve from elsewhere."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if name_or_path and path.exists() else name_or_path


def start_run(config: BaseModel, output: str, *, resume: bool, overwrite: bool) -> RunDir:
    """Prepare the run directory and write the fully resolved config.yaml."""
    from accelerate import PartialState

    state = PartialState()
    run = RunDir(output)
    state.wait_for_everyone()  # every process has checked the directory before it changes
    if state.is_main_process:  # under `accelerate launch`, one process owns the directory
        run.prepare(resume=resume, overwrite=overwrite)
        atomic_write_text(run.config, config_to_yaml(config))
    state.wait_for_everyone()
    return run


def collate_rendered(rows: list[Rendered], pad_id: int) -> dict:
    """Pad rendered rows into a batch with the loop's `n_items` (trained tokens) and `n_tokens`."""
    batch = pad_batch([r.ids for r in rows], [r.mask for r in rows], pad_id)
    batch["n_items"] = int(batch["loss_mask"].sum())
    batch["n_tokens"] = int(batch["attention_mask"].sum())
    return batch


def rendered_plan(lengths: list[int], source_sizes: list[int], weights: list[float], batch_size: int,
                  seed: int, group_by_length: bool):
    """The loop's `plan(epoch)`: mixture-weighted, optionally length-grouped batches of row indices."""
    def plan(epoch: int) -> list[list[int]]:
        indices = mixture_indices(source_sizes, weights, seed, epoch)
        return epoch_batches(indices, lengths, batch_size, seed, epoch, group_by_length)
    return plan


def eval_batches(rows: list[Rendered], batch_size: int, pad_id: int) -> list[dict]:
    """Held-out rows sorted by length and batched (order does not matter for a mean)."""
    ordered = sorted(rows, key=lambda r: len(r.ids))
    return [collate_rendered(ordered[i:i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)]


def write_final(run: RunDir, model, tokenizer) -> Path:
    """Save the trained model (or adapter) and tokenizer to final/, atomically."""
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        with atomic_dir(run.final) as tmp:
            save_pretrained(model, tokenizer, tmp)
    state.wait_for_everyone()
    return run.final

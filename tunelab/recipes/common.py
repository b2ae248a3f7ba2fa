"""Pieces every recipe shares: starting a run directory, batching tokenized rows, writing final/."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic

import torch
from pydantic import BaseModel
from torch import nn

from tunelab import distributed, pause, trackers
from tunelab.checkpoint import (RunDir, RunDirError, atomic_dir, atomic_write_text, main_writes, state_bytes,
                                write_failure)
from tunelab.config import RecipeConfig, config_to_yaml
from tunelab.data.batching import epoch_batches, mixture_indices, pad_batch
from tunelab.data.dataset import Item, TokenizedData
from tunelab.data.templates import Rendered
from tunelab.distributed import log
from tunelab.runconfig import check_resume_config
from tunelab.modeling import (activation_bytes_per_token, apply_peft, check_quantization_possible, count_parameters,
                              load_tokenizer, resolve_lora_targets, save_pretrained)


def absolute_if_local(name_or_path: str) -> str:
    """Local model paths are stored absolute, so adapters and configs still resolve from elsewhere."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if name_or_path and path.exists() else name_or_path


def start_run(config: BaseModel, output: str, *, resume: bool, overwrite: bool, header: str = "") -> RunDir:
    """Prepare the run directory and write the fully resolved config.yaml (with `header` as a comment)."""
    run = RunDir(output)

    def write() -> None:
        run.prepare(resume=resume, overwrite=overwrite)
        try:
            atomic_write_text(run.config, (f"# {header}\n" if header else "") + config_to_yaml(config))
        except OSError as exc:
            raise RunDirError(f"cannot write {run.config}: {exc.strerror or exc}") from None

    distributed.wait()  # every process has checked the directory before it changes
    main_writes(write)  # with several processes, one owns the directory
    return run


@dataclass
class Prepared(Generic[Item]):
    """What a recipe has once its inputs are validated: run directory, tokenizer, data, wrapped model."""

    run: RunDir
    tokenizer: object
    data: TokenizedData[Item]
    model: nn.Module


def prepare_recipe(config: RecipeConfig, *, resume: bool, overwrite: bool,
                   prepare_data: Callable[[object], TokenizedData[Item]],
                   load_model: Callable[[object], nn.Module], task_type: str,
                   allow_changes: bool = False) -> Prepared[Item]:
    """Validate everything that can fail on bad input, then create the run directory.

    Order matters: the output directory is checked first and only created once the model and data
    have loaded, so a typo never leaves a half-made run behind. The process group is formed first, so
    every later step (device placement, QLoRA loading) knows its process. On resume the saved config is
    compared with this one first (see `tunelab.runconfig`; `allow_changes` lets any change through).
    """
    state = distributed.state()
    if state.num_processes > 1:
        log(f"processes: {state.num_processes} ({state.distributed_type.value}, {state.backend}, {state.device.type})")
    RunDir(config.output).check(resume=resume, overwrite=overwrite)
    if config.peft == "qlora":
        check_quantization_possible()
    config.model.name_or_path = absolute_if_local(config.model.name_or_path)
    if resume:
        run_dir = RunDir(config.output)
        if run_dir.config.is_file():
            check_resume_config(run_dir.config.read_text(), config_to_yaml(config), allow_changes, say=log)
    tokenizer = load_tokenizer(config.model)
    data = prepare_data(tokenizer)
    for line in data.summary_lines():
        log(f"data: {line}")
    torch.manual_seed(config.train.seed)
    model = load_model(tokenizer)
    resolve_lora_targets(config, model)
    model = apply_peft(model, config, task_type=task_type)
    trainable, total = count_parameters(model)
    counts = f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"
    log(f"model: {config.model.name_or_path} ({config.peft}: {counts})")
    run = start_run(config, config.output, resume=resume, overwrite=overwrite, header=f"{config.peft}: {counts}")
    trackers.start(config, run.path)
    return Prepared(run, tokenizer, data, model)


def collate_rendered(rows: list[Rendered], pad_id: int) -> dict:
    """Pad rendered rows into a batch with the loop's `n_items` (trained tokens) and `n_tokens`."""
    batch = pad_batch([r.ids for r in rows], [r.mask for r in rows], pad_id)
    batch["n_items"] = int(batch["loss_mask"].sum())
    batch["n_tokens"] = int(batch["attention_mask"].sum())
    return batch


def batch_plan(data: TokenizedData, lengths: list[int], config: RecipeConfig):
    """The loop's `plan(epoch)`: mixture-weighted, optionally length-grouped batches of train indices."""
    train = config.train

    def plan(epoch: int) -> list[list[int]]:
        indices = mixture_indices(data.source_sizes, data.weights, train.seed, epoch)
        return epoch_batches(indices, lengths, train.batch_size, train.seed, epoch, train.group_by_length)
    return plan


def eval_batches(items: list, lengths: list[int], batch_size: int, collate: Callable[[list], dict]) -> list[dict]:
    """Held-out items sorted by length and batched (order does not matter for a mean)."""
    ordered = [items[i] for i in sorted(range(len(items)), key=lambda i: lengths[i])]
    return [collate(ordered[i:i + batch_size]) for i in range(0, len(ordered), batch_size)]


def split_by_tokens(indices: list[int], lengths: list[int], budget: int | None) -> list[list[int]]:
    """Split one batch into micro-batches whose padded size (rows x longest row) stays within `budget`.

    Rows are taken shortest first, so each micro-batch pads only to its own longest row; a row longer than
    the budget gets a micro-batch of its own. The loop sums the micro-batches' losses and divides by the
    batch's total `n_items`, so the gradient equals the unsplit batch's.
    """
    if not budget:
        return [indices]
    pieces, current = [], []
    for i in sorted(indices, key=lambda i: lengths[i]):
        if current and (len(current) + 1) * lengths[i] > budget:
            pieces.append(current)
            current = []
        current.append(i)
    return pieces + [current] if current else pieces


def micro_batch_budget(config: RecipeConfig, model: nn.Module, device: torch.device) -> int | None:
    """`train.micro_batch_tokens` in force for this model on this device (`auto` resolved)."""
    return config.train.micro_batch_budget(device.type, activation_bytes_per_token(model))


def train_recipe(prepared: Prepared, config: RecipeConfig, *, module: nn.Module, step_fn,
                 collate: Callable[[list], dict], length: Callable[[object], int], desc: str, resume: bool,
                 quiet: bool, prepare_step=None, regroup: Callable[[list], list] | None = None,
                 padded_length: Callable[[object], int] | None = None):
    """Run the shared loop on a recipe's prepared data: length-grouped train batches, held-out batches.

    `length` orders the length grouping; `padded_length` (default `length`), an item's width in its
    collated batch, sizes the micro-batches: packed pairs change the second but not which items share a batch.

    `regroup`, when given, maps each training batch's items (in the plan's order) to the items its
    micro-batches collate, one for one, before the batch is split: what an item needs from the rest of
    its batch (KTO's mismatched completions) is then the same whatever `train.micro_batch_tokens` is.
    `prepare_step`: see `tunelab.loop.train`."""
    from tunelab.loop import train

    data, rows = prepared.data, prepared.data.train
    lengths = [length(r) for r in rows]
    widths = [padded_length(r) for r in rows] if padded_length is not None else lengths
    budget = micro_batch_budget(config, prepared.model, distributed.state().device)

    def collate_batch(indices: list[int]) -> list[dict]:
        items = [rows[i] for i in indices]
        if regroup is not None:
            items = regroup(items)
        pieces = split_by_tokens(list(range(len(indices))), [widths[i] for i in indices], budget)
        return [collate([items[k] for k in piece]) for piece in pieces]

    return train(module=module, step_fn=step_fn, plan=batch_plan(data, lengths, config), collate=collate_batch,
                 eval_batches=eval_batches(data.held_out, [(padded_length or length)(r) for r in data.held_out],
                                           config.train.batch_size, collate),
                 config=config.train, lr=config.resolved_lr(), run=prepared.run, resume=resume, quiet=quiet,
                 desc=desc, prepare_step=prepare_step, export=model_export(prepared.model, prepared.tokenizer))


def model_export(model, tokenizer):
    """`export(whole)` for checkpoints and final/: gathers `model`'s weights from the prepared module `whole`
    (on every process, where training sharded them) and returns a function that saves the model (or adapter)
    and tokenizer into a folder, as plain transformers/peft load them."""
    def export(whole: nn.Module | None):
        state = distributed.whole_state_dict(whole, model) if whole is not None else None
        return lambda folder: save_pretrained(model, tokenizer, folder, state_dict=state)
    return export


def write_final(run: RunDir, model, tokenizer, whole: nn.Module | None = None, config: RecipeConfig | None = None,
                data: TokenizedData | None = None) -> Path:
    """Save the trained model (or adapter) and tokenizer to final/, atomically, with the run's model card
    (README.md, from `config`, `data` and metrics.jsonl) when `config` is given.

    `whole` is the prepared module holding `model` (sharded under FSDP2 or ZeRO-3): every process joins
    in gathering its parameters, and the main process writes.
    """
    state = distributed.whole_state_dict(whole, model) if whole is not None else None
    check_final_weights(run, model, state)

    def write() -> None:
        good = run.latest_checkpoint()
        try:
            with atomic_dir(run.final, manifest=True) as tmp:
                save_pretrained(model, tokenizer, tmp, state_dict=state)
                if config is not None:
                    from tunelab.card import write_run_card

                    write_run_card(tmp, config, data, run.metrics, run.final)
                pause.at("final")
        except OSError as exc:
            needed = state_bytes(state if state is not None else model.state_dict())
            raise write_failure("final/", run.path, exc, needed, good) from exc

    main_writes(write)
    return run.final


def check_final_weights(run: RunDir, model: nn.Module, state: dict | None) -> None:
    """Refuse to write final/ from weights that hold NaN or infinity (the last steps diverged)."""
    from tunelab.loop import TrainingError, nonfinite_name

    tensors = state.items() if state is not None else model.named_parameters()
    bad = nonfinite_name(tensors) if distributed.is_main() else None
    if distributed.all_sum_floats([float(bad is not None)])[0]:
        good = run.latest_checkpoint()
        raise TrainingError(f"the trained weights hold NaN or infinity ({bad or 'on another process'}); final/ "
                            f"was not written. Last good checkpoint: {good or 'none'}. Try a lower learning "
                            "rate (--lr), gradient clipping (train.max_grad_norm) or fp32 precision.")

"""Supervised fine-tuning: next-token loss on completions (or on all text), LoRA or full parameters.

What is specific to SFT: one model role (the policy), the masked cross-entropy, and its data
(text, prompt/completion, alpaca or messages rows). Everything else is the shared loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.checkpoint import RunDir
from tunelab.config import SFTConfig
from tunelab.data.dataset import TokenizedData, prepare_sft_data
from tunelab.logprobs import LogprobModel
from tunelab.loop import TrainResult, train
from tunelab.losses import sft_loss
from tunelab.modeling import apply_peft, count_parameters, load_causal_lm, load_tokenizer
from tunelab.recipes.common import (absolute_if_local, collate_rendered, eval_batches, log, rendered_plan,
                                    start_run, write_final)
from tunelab.data.templates import resolve_chat_template


@dataclass
class SFTResult:
    run_dir: Path
    final_dir: Path
    train: TrainResult
    data: TokenizedData


def sft_step(module: LogprobModel, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss sum over the batch's trained tokens (the loop divides by `n_items`)."""
    logprobs = module(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    loss_sum, _ = sft_loss(logprobs, batch["loss_mask"])
    return loss_sum, {}


def run_sft(config: SFTConfig, *, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> SFTResult:
    """Train a causal LM with supervised fine-tuning and write `final/` into `config.output`."""
    # everything that can fail on bad input runs before the run directory is touched
    RunDir(config.output).check(resume=resume, overwrite=overwrite)
    config.model.name_or_path = absolute_if_local(config.model.name_or_path)
    tokenizer = load_tokenizer(config.model)
    data = prepare_sft_data(config.data, tokenizer, seed=config.train.seed)
    for line in data.summary_lines():
        log(f"data: {line}")
    torch.manual_seed(config.train.seed)
    model = apply_peft(load_causal_lm(config.model), config.peft, config.lora)
    run = start_run(config, config.output, resume=resume, overwrite=overwrite)
    trainable, total = count_parameters(model)
    log(f"model: {config.model.name_or_path} ({config.peft}: training {trainable:,} of {total:,} parameters)")
    template = resolve_chat_template(tokenizer, config.data.chat_template)
    if template:
        tokenizer.chat_template = template  # final/ generates with the template it was trained on

    pad_id = tokenizer.pad_token_id
    rows = data.train
    module = LogprobModel(model, config.train.logprob_chunk)
    plan = rendered_plan([len(r.ids) for r in rows], data.source_sizes, data.weights, config.train.batch_size,
                         config.train.seed, config.train.group_by_length)
    result = train(module=module, step_fn=sft_step, plan=plan,
                   collate=lambda ix: collate_rendered([rows[i] for i in ix], pad_id),
                   eval_batches=eval_batches(data.held_out, config.train.batch_size, pad_id),
                   config=config.train, lr=config.resolved_lr(), run=run, resume=resume, quiet=quiet, desc="sft")
    final = write_final(run, model, tokenizer)
    eval_loss = result.eval_metrics.get("loss")
    log(f"sft done: {result.steps} steps in {result.seconds:.1f}s, last train loss {result.train_loss:.4f}"
        + (f", held-out loss {eval_loss:.4f}" if eval_loss is not None else "") + f"; model in {final}")
    return SFTResult(run.path, final, result, data)

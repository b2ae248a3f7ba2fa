"""Supervised fine-tuning: next-token loss on completions (or on all text), LoRA or full parameters.

What is specific to SFT: one model role (the policy), the masked cross-entropy, and its data
(text, prompt/completion, alpaca or messages rows). Everything else is the shared loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.config import SFTConfig
from tunelab.data.dataset import TokenizedData, prepare_sft_data
from tunelab.data.templates import resolve_chat_template
from tunelab.logprobs import LogprobModel
from tunelab.loop import TrainResult
from tunelab.losses import sft_loss
from tunelab.modeling import is_encoder_decoder_model, load_lm
from tunelab.recipes.common import collate_rendered, log, prepare_recipe, train_recipe, write_final
from tunelab.runlock import releasing
from tunelab.trackers import tracked


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


@releasing
@tracked
def run_sft(config: SFTConfig, *, resume: bool = False, overwrite: bool = False,
            allow_changes: bool = False, quiet: bool = False) -> SFTResult:
    """Train a language model with supervised fine-tuning and write `final/` into `config.output`.

    An encoder-decoder (T5, BART) reads each row's prompt with its encoder and is trained on the completion
    and EOS as its decoder's target."""
    prepared = prepare_recipe(config, resume=resume, overwrite=overwrite,
                              allow_changes=allow_changes, task_type="CAUSAL_LM",
                              prepare_data=lambda tok: prepare_sft_data(
                                  config.data, tok, seed=config.train.seed,
                                  encoder_decoder=is_encoder_decoder_model(config.model.name_or_path,
                                                                           config.model.trust_remote_code)),
                              load_model=lambda tok: load_lm(config.model, config.quantization_in_force()))
    tokenizer, data, model = prepared.tokenizer, prepared.data, prepared.model
    template = resolve_chat_template(tokenizer, config.data.chat_template)
    if template:
        tokenizer.chat_template = template  # final/ generates with the template it was trained on

    result = train_recipe(prepared, config, module=LogprobModel(model, config.train.logprob_chunk),
                          step_fn=sft_step, collate=lambda rows: collate_rendered(rows, tokenizer.pad_token_id),
                          length=lambda row: len(row.ids), desc="sft", resume=resume, quiet=quiet)
    final = write_final(prepared.run, model, tokenizer, whole=result.module, config=config,
                        data=prepared.data)
    eval_loss = result.eval_metrics.get("loss")
    train_loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "not logged"
    log(f"sft done: {result.steps} steps in {result.seconds:.1f}s, last train loss {train_loss}"
        + (f", held-out loss {eval_loss:.4f}" if eval_loss is not None else "") + f"; model in {final}")
    return SFTResult(prepared.run.path, final, result, data)

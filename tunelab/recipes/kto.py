"""KTO (Ethayarajh et al., 2024): learn from unpaired feedback, each completion marked desirable or not.

Each row's implicit reward is beta * (log pi(y|x) - log ref(y|x)), pushed above a reference point z0 for
desirable rows and below it for undesirable ones (`tunelab.losses.kto_loss`). z0 estimates KL(pi || ref)
from mismatched rows: within each batch, row j's prompt with row j+1's completion (paired before the
batch is split into micro-batches, so `train.micro_batch_tokens` does not change it), scored by the policy
and the reference without gradients or dropout. It is one number per optimizer step, the mean over every
micro-batch of every process (clamped at 0), so N processes train as one does with N x the accumulation.
Held-out batches each take z0 from their own rows.

The reference follows DPO's rules: the policy's base with the adapter disabled under LoRA, a frozen copy
with full fine-tuning or a `--ref` naming another model. Its log-probs are computed as training goes (the
mismatched rows depend on how each epoch's batches fall, so there is nothing to precompute once).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tunelab import distributed
from tunelab.config import KTOConfig, ModelConfig
from tunelab.data.dataset import TokenizedData
from tunelab.data.feedback import collate_feedback, item_length, prepare_feedback_data, with_kl_partners
from tunelab.logprobs import LogprobModel
from tunelab.loop import TrainResult, to_device
from tunelab.losses import kto_loss, kto_reference_point
from tunelab.modeling import load_lm
from tunelab.recipes.common import log, prepare_recipe, train_recipe, write_final
from tunelab.recipes.dpo import RefFn, reference_fn
from tunelab.runlock import releasing
from tunelab.trackers import tracked


@dataclass
class KTOResult:
    run_dir: Path
    final_dir: Path
    train: TrainResult
    data: TokenizedData
    reference: str


KL_KEYS = ("input_ids", "attention_mask", "loss_mask")


def kl_logratios(module: nn.Module, batch: dict, reference: RefFn) -> torch.Tensor:
    """log pi - log ref of the batch's valid mismatched rows `[M]`, without gradients or dropout."""
    kl_batch = {key: batch[f"kl_{key}"] for key in KL_KEYS}
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            policy = module(*(kl_batch[key] for key in KL_KEYS)).sum(-1)
    finally:
        module.train(was_training)
    return (policy - reference(kl_batch))[batch["kl_valid"]]


def prepare_kto_step(reference: RefFn):
    """The loop's once-per-step hook: z0 over all of the step's micro-batches on all processes."""
    def prepare(module: nn.Module, weighted: list[tuple[dict, float]], device: torch.device) -> None:
        parts = []
        for batch, weight in weighted:
            logratios = kl_logratios(module, to_device(batch, device), reference)
            if weight:  # (a repeat that only keeps sharded processes in step counts for nothing)
                parts.append(logratios)
        z0 = kto_reference_point(torch.cat(parts) if parts else torch.zeros(0, device=device),
                                 all_sum=distributed.all_sum)
        for batch, _ in weighted:
            batch["kl_reference_point"] = float(z0)
    return prepare


def kto_step(config: KTOConfig, reference: RefFn):
    """The loop's step function: policy and reference log-probs of every row, then the KTO loss."""
    kto = config.kto

    def step(module: LogprobModel, batch: dict) -> tuple[torch.Tensor, dict]:
        if "kl_reference_point" in batch:
            z0 = batch["kl_reference_point"]
        else:  # a held-out batch: its own rows alone
            z0 = float(kto_reference_point(kl_logratios(module, batch, reference)))
        logps = module(batch["input_ids"], batch["attention_mask"], batch["loss_mask"]).sum(-1)
        ref = reference(batch)
        loss_sum, sums = kto_loss(logps, ref, batch["desirable"], z0, kto.beta, kto.desirable_weight,
                                  kto.undesirable_weight)
        metrics = {key: (float(total), float(count)) for key, (total, count) in sums.items()}
        metrics["kl"] = z0
        # preference pairs (held out whole): does the desirable side's reward beat the undesirable side's?
        pairs = batch["pairs"]
        rewards = kto.beta * (logps.detach() - ref)
        margins = rewards[pairs[:, 0]] - rewards[pairs[:, 1]]
        metrics["reward_accuracy"] = (float((margins > 0).sum()), float(len(pairs)))
        metrics["reward_margin"] = (float(margins.sum()), float(len(pairs)))
        return loss_sum, metrics
    return step


def kto_reference(policy: nn.Module, ref_model: nn.Module | None, chunk: int) -> RefFn:
    """DPO's reference function; a frozen copy outside the engine is gathered whole where ZeRO-3 split it."""
    reference = reference_fn(policy, ref_model, chunk)
    if ref_model is None:
        return reference

    def gathered_reference(batch: dict) -> torch.Tensor:
        with distributed.gathered(ref_model):
            return reference(batch)
    return gathered_reference


@releasing
@tracked
def run_kto(config: KTOConfig, *, resume: bool = False, overwrite: bool = False,
            allow_changes: bool = False, quiet: bool = False) -> KTOResult:
    """Optimize a policy on desirable/undesirable feedback and write `final/` into `config.output`."""
    prepared = prepare_recipe(config, resume=resume, overwrite=overwrite,
                              allow_changes=allow_changes, task_type="CAUSAL_LM",
                              prepare_data=lambda tok: prepare_feedback_data(config.data, tok, seed=config.train.seed),
                              load_model=lambda tok: load_lm(config.model, config.quantization_in_force()))
    tokenizer, data, policy = prepared.tokenizer, prepared.data, prepared.model
    desirable = sum(item.rows[0].desirable for item in data.train)
    undesirable = len(data.train) - desirable
    log(f"feedback: {desirable} desirable and {undesirable} undesirable train rows; weighted ratio "
        f"{config.kto.desirable_weight * desirable / max(config.kto.undesirable_weight * undesirable, 1e-9):.3g} "
        "(KTO suggests 1 to 4/3)")
    chunk = config.train.logprob_chunk
    same_weights = config.ref is None or config.ref == config.model.name_or_path
    ref_model = None
    if config.peft == "none" or not same_weights:
        ref_path = config.ref or config.model.name_or_path
        ref_model = load_lm(ModelConfig(name_or_path=ref_path, dtype=config.model.dtype,
                                               trust_remote_code=config.model.trust_remote_code))
        ref_model.requires_grad_(False).eval().to(distributed.state().device)
        source = f"frozen copy of {ref_path}"
    else:
        source = "adapter disabled"
    log(f"reference: {source}")
    reference = kto_reference(policy, ref_model, chunk)
    result = train_recipe(prepared, config, module=LogprobModel(policy, chunk), step_fn=kto_step(config, reference),
                          collate=lambda items: collate_feedback(items, tokenizer.pad_token_id,
                                                                 config.data.max_length),
                          length=item_length, desc="kto", resume=resume, quiet=quiet,
                          prepare_step=prepare_kto_step(reference), regroup=with_kl_partners)
    final = write_final(prepared.run, policy, tokenizer, whole=result.module, config=config,
                        data=prepared.data)
    held = result.eval_metrics
    log(f"kto done: {result.steps} steps in {result.seconds:.1f}s"
        + (f"; held-out kl {held['kl']:.3f}" if "kl" in held else "")
        + (f", reward accuracy {held['reward_accuracy']:.3f}" if "reward_accuracy" in held else "")
        + f"; model in {final}")
    return KTOResult(prepared.run.path, final, result, data, source)

"""Direct preference optimization: learn from preference pairs directly, with no reward model and no sampling.

What is specific here: two model roles (the trained policy and a frozen reference), both sides of every
pair in one forward pass with log-probs on completion tokens only, and the DPO loss family. The
reference is, cheapest first:
  - none at all: the reference-free losses (`dpo.loss=simpo` or `orpo`) never load or compute one;
  - precomputed: log-probs computed once before training (`dpo.precompute_ref`), then the model is freed;
  - the policy's own base with the adapter disabled (LoRA): no second copy in memory;
  - a frozen copy (full fine-tuning, or `--ref` naming another model).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from tunelab import distributed

from tunelab.config import ConfigError, DPOConfig, ModelConfig
from tunelab.data.dataset import TokenizedData
from tunelab.data.preference import PolicyPair, prepare_policy_pairs
from tunelab.logprobs import LogprobModel, token_logprobs
from tunelab.loop import TrainResult, to_device
from tunelab.losses import dpo_loss, orpo_loss, simpo_loss
from tunelab.modeling import adapter_disabled, load_lm
from tunelab.recipes.common import (collate_rendered, log, micro_batch_budget, prepare_recipe, split_by_tokens,
                                    train_recipe, write_final)
from tunelab.runlock import releasing
from tunelab.shared_prefix import pack_pairs, packed_length, packed_pair_logprobs, shared_prefix_in_force
from tunelab.trackers import tracked

RefFn = Callable[[dict], torch.Tensor]


@dataclass
class DPOResult:
    run_dir: Path
    final_dir: Path
    train: TrainResult
    data: TokenizedData
    reference: str


PACKED_INPUTS = ("position_ids", "segments", "chosen_mask", "rejected_mask", "parent")


def collate_policy_pairs(pairs: list[PolicyPair], pad_id: int, share_prefix: bool = False) -> dict:
    """Chosen rows then rejected rows `[2N, T]` with completion masks, or with `share_prefix` one packed row per
    pair (`tunelab.shared_prefix.pack_pairs`); precomputed `ref_logps [2N]` if known."""
    if share_prefix:
        batch = {k: v for k, v in pack_pairs([(p.chosen.ids, p.rejected.ids) for p in pairs], pad_id,
                                             [(p.chosen.mask, p.rejected.mask) for p in pairs]).items()
                 if k == "input_ids" or k in PACKED_INPUTS}
        batch["n_tokens"] = sum(len(p.chosen.ids) + len(p.rejected.ids) for p in pairs)
    else:
        batch = collate_rendered([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch["n_items"] = len(pairs)
    if all(p.ref_chosen is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs])
    return batch


def sequence_logprobs(model: nn.Module, batch: dict, chunk_size: int) -> torch.Tensor:
    """Summed completion log-probs of each side `[2N]` (chosen sides, then rejected)."""
    if "segments" in batch:
        return packed_pair_logprobs(model, batch, chunk_size)
    return token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], chunk_size).sum(-1)


def side_logprobs(module: LogprobModel, batch: dict) -> torch.Tensor:
    """`sequence_logprobs` through the trained module's forward (so data-parallel wrappers see it)."""
    if "segments" in batch:
        return module(batch["input_ids"], **{k: batch[k] for k in PACKED_INPUTS})
    return module(batch["input_ids"], batch["attention_mask"], batch["loss_mask"]).sum(-1)


def side_tokens(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Scored tokens of each chosen and each rejected side, `[N]` and `[N]`."""
    if "segments" in batch:
        return batch["chosen_mask"].sum(-1), batch["rejected_mask"].sum(-1)
    return batch["loss_mask"].sum(-1).chunk(2)


def reference_fn(policy: nn.Module, ref_model: nn.Module | None, chunk_size: int) -> RefFn:
    """Reference log-probs of a batch: from `ref_model`, or from `policy` with its adapter disabled."""
    @torch.no_grad()
    def reference(batch: dict) -> torch.Tensor:
        model = ref_model if ref_model is not None else policy
        was_training = model.training
        model.eval()  # no dropout in the reference
        try:
            if ref_model is not None:
                return sequence_logprobs(ref_model, batch, chunk_size)
            with adapter_disabled(policy) as base:
                return sequence_logprobs(base, batch, chunk_size)
        finally:
            model.train(was_training)
    return reference


def dpo_step(config: DPOConfig, reference: RefFn | None):
    """The loop's step function: policy (and, but for simpo and orpo, reference) log-probs of both sides,
    then the preference loss."""
    dpo = config.dpo
    beta = dpo.resolved_beta()

    def step(module: LogprobModel, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        policy_chosen, policy_rejected = side_logprobs(module, batch).chunk(2)
        chosen_tokens, rejected_tokens = side_tokens(batch)
        if dpo.loss == "simpo":
            loss_sum, metrics = simpo_loss(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, beta,
                                           dpo.gamma)
        elif dpo.loss == "orpo":
            loss_sum, metrics = orpo_loss(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, beta)
        else:
            ref = batch["ref_logps"] if "ref_logps" in batch else reference(batch)
            ref_chosen, ref_rejected = ref.chunk(2)
            loss_sum, metrics = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, dpo.loss,
                                         dpo.label_smoothing)
        if dpo.sft_weight:
            nll = -(policy_chosen / chosen_tokens.clamp(min=1))
            loss_sum = loss_sum + dpo.sft_weight * nll.sum()
            metrics["sft_nll"] = nll.detach().mean()
        return loss_sum, {k: float(v) for k, v in metrics.items()}
    return step


def pair_length(pair: PolicyPair) -> int:
    return len(pair.chosen.ids) + len(pair.rejected.ids)


def shared_pair_length(pair: PolicyPair) -> int:
    return packed_length(pair.chosen.ids, pair.rejected.ids)


def precompute_reference(pairs: list[PolicyPair], reference: RefFn, pad_id: int, batch_size: int,
                         budget: int | None, device: torch.device, share_prefix: bool = False) -> None:
    """Store reference log-probs on every pair, so the reference model is needed only once.

    Pairs go shortest first, `batch_size` at a time, split further to stay within `budget` padded tokens.
    With several processes each computes every N-th batch and the results are gathered, so every
    process ends with all pairs' values, each computed once.
    """
    lengths = [(shared_pair_length if share_prefix else pair_length)(p) for p in pairs]
    ordered = sorted(range(len(pairs)), key=lambda i: lengths[i])
    starts = range(0, len(ordered), batch_size)[distributed.rank()::distributed.world_size()]
    mine: dict[int, tuple[float, float]] = {}
    for start in starts:
        for piece in split_by_tokens(ordered[start:start + batch_size], lengths, budget):
            batch = collate_policy_pairs([pairs[i] for i in piece], pad_id, share_prefix)
            ref = reference(to_device(batch, device)).tolist()
            mine.update((i, pair) for i, pair in zip(piece, zip(ref[:len(piece)], ref[len(piece):])))
    for part in distributed.gather_objects(mine):
        for i, (chosen, rejected) in part.items():
            pairs[i].ref_chosen, pairs[i].ref_rejected = chosen, rejected


def check_reference_free(config: DPOConfig) -> None:
    """simpo and orpo take no reference: the reference settings would silently do nothing, so they are errors."""
    dpo = config.dpo
    if not dpo.reference_free:
        return
    if config.ref is not None:
        raise ConfigError(f"--ref (ref) has no use with dpo.loss={dpo.loss}, which is reference-free; drop it or "
                          "pick a loss with a reference (sigmoid, robust, ipo, hinge)")
    if dpo.precompute_ref:
        raise ConfigError(f"dpo.precompute_ref=true has no use with dpo.loss={dpo.loss}, which is reference-free")
    if dpo.loss == "orpo" and dpo.sft_weight:
        raise ConfigError("dpo.sft_weight does not apply to dpo.loss=orpo: its loss already holds the chosen "
                          "response's NLL (weight 1); the odds-ratio term's weight is dpo.beta")


@releasing
@tracked
def run_dpo(config: DPOConfig, *, resume: bool = False, overwrite: bool = False,
            allow_changes: bool = False, quiet: bool = False) -> DPOResult:
    """Optimize a policy on preference pairs and write `final/` into `config.output`."""
    check_reference_free(config)
    config.dpo.beta = config.dpo.resolved_beta()  # config.yaml records the value in force
    prepared = prepare_recipe(config, resume=resume, overwrite=overwrite,
                              allow_changes=allow_changes, task_type="CAUSAL_LM",
                              prepare_data=lambda tok: prepare_policy_pairs(config.data, tok, seed=config.train.seed),
                              load_model=lambda tok: load_lm(config.model, config.quantization_in_force()))
    tokenizer, data, policy = prepared.tokenizer, prepared.data, prepared.model
    share = shared_prefix_in_force(config.dpo.share_prefix, "dpo.share_prefix", policy)
    if config.dpo.reference_free:
        return _train_and_finish(prepared, config, policy, None, f"none ({config.dpo.loss} is reference-free)",
                                 resume, quiet, share)
    chunk, device = config.train.logprob_chunk, distributed.state().device
    same_weights = config.ref is None or config.ref == config.model.name_or_path
    # full fine-tuning from the reference's own weights: the policy before its first update is the
    # reference, so its log-probs are computed up front and no second copy is ever loaded
    from_start = config.peft == "none" and same_weights
    separate_ref = not from_start and (config.peft == "none" or not same_weights)
    ref_model = None
    if separate_ref:
        ref_path = config.ref or config.model.name_or_path
        ref_model = load_lm(ModelConfig(name_or_path=ref_path, dtype=config.model.dtype,
                                               trust_remote_code=config.model.trust_remote_code))
        ref_model.requires_grad_(False).eval()
        share = shared_prefix_in_force(share, "dpo.share_prefix", ref_model)
    reference = reference_fn(policy, policy if from_start else ref_model, chunk)
    source = f"frozen copy of {config.ref or config.model.name_or_path}" if separate_ref else "adapter disabled"

    if config.dpo.precompute_ref or from_start:
        for model in (policy, ref_model):
            if model is not None:
                model.to(device)
        # (under ZeRO-3 the models were loaded partitioned: gathered whole for this pass)
        with distributed.gathered(policy), distributed.gathered(ref_model or policy):
            precompute_reference(data.train + data.held_out, reference, tokenizer.pad_token_id,
                                 config.train.batch_size, micro_batch_budget(config, policy, device), device, share)
        reference, ref_model = None, None  # freed: every batch now carries its reference log-probs
        gc.collect()
        source = ("precomputed from the starting weights before the first update (no second copy)" if from_start
                  else f"precomputed ({source}), then freed")
    if ref_model is not None:
        ref_model.to(device)
    return _train_and_finish(prepared, config, policy, reference, source, resume, quiet, share)


def _train_and_finish(prepared, config: DPOConfig, policy: nn.Module, reference: RefFn | None, source: str,
                      resume: bool, quiet: bool, share: bool) -> DPOResult:
    log(f"reference: {source}")
    tokenizer, data, chunk = prepared.tokenizer, prepared.data, config.train.logprob_chunk
    result = train_recipe(prepared, config, module=LogprobModel(policy, chunk), step_fn=dpo_step(config, reference),
                          collate=lambda pairs: collate_policy_pairs(pairs, tokenizer.pad_token_id, share),
                          length=pair_length, padded_length=shared_pair_length if share else None, desc="dpo",
                          resume=resume, quiet=quiet)
    final = write_final(prepared.run, policy, tokenizer, whole=result.module, config=config,
                        data=prepared.data)
    held = result.eval_metrics
    log(f"dpo done: {result.steps} steps in {result.seconds:.1f}s"
        + (f"; held-out reward accuracy {held['reward_accuracy']:.3f}, margin {held['reward_margin']:.3f}"
           if held else "") + f"; model in {final}")
    return DPOResult(prepared.run.path, final, result, data, source)

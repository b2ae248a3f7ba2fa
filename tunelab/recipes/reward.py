"""Reward modeling: a one-output sequence classifier trained on preference pairs with a Bradley-Terry loss.

What is specific here: the model role (a sequence-classification head on a causal LM or an encoder;
with LoRA the head itself is trained in full), pairs scored chosen and rejected in one forward pass,
and the pairwise loss with optional margin and reward centering.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.config import RMConfig
from tunelab.data.batching import pad_batch
from tunelab.data.dataset import TokenizedData
from tunelab.data.preference import ScoredPair, prepare_preference_data
from tunelab.loop import TrainResult
from tunelab.losses import bradley_terry_loss
from tunelab.modeling import load_reward_model
from tunelab.recipes.common import log, prepare_recipe, train_recipe, write_final
from tunelab.rewards import RewardModule
from tunelab.runlock import releasing
from tunelab.shared_prefix import pack_pairs, packed_length, shared_prefix_in_force
from tunelab.trackers import tracked


@dataclass
class RMResult:
    run_dir: Path
    final_dir: Path
    train: TrainResult
    data: TokenizedData


def collate_pairs(pairs: list[ScoredPair], pad_id: int, share_prefix: bool = False) -> dict:
    """Chosen rows then rejected rows in one padded batch `[2N, T]`, with margins `[N]`; with `share_prefix`,
    one packed row per pair instead (`tunelab.shared_prefix.pack_pairs`)."""
    if share_prefix:
        batch = pack_pairs([(p.chosen, p.rejected) for p in pairs], pad_id)
    else:
        sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        batch = pad_batch(sequences, [[0] * len(s) for s in sequences], pad_id)
        del batch["loss_mask"]
    batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    batch["n_items"] = len(pairs)
    batch["n_tokens"] = sum(len(p.chosen) + len(p.rejected) for p in pairs)
    return batch


SCORE_INPUTS = ("input_ids", "attention_mask", "position_ids", "segments", "chosen_end", "rejected_end")


def reward_step(center_coef: float, use_margin: bool):
    """The loop's step function: score both sides of every pair and apply the Bradley-Terry loss."""
    def step(module: RewardModule, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        scores = module(**{k: v for k, v in batch.items() if k in SCORE_INPUTS})
        chosen, rejected = scores.chunk(2)
        loss_sum, metrics = bradley_terry_loss(chosen, rejected, batch["margin"] if use_margin else None,
                                               center_coef)
        return loss_sum, {k: float(v) for k, v in metrics.items()}
    return step


@releasing
@tracked
def run_rm(config: RMConfig, *, resume: bool = False, overwrite: bool = False,
           allow_changes: bool = False, quiet: bool = False) -> RMResult:
    """Train a reward model and write `final/` (model or adapter + head, and tokenizer) into `config.output`."""
    prepared = prepare_recipe(
        config, resume=resume, overwrite=overwrite, allow_changes=allow_changes, task_type="SEQ_CLS",
        prepare_data=lambda tok: prepare_preference_data(config.data, tok, seed=config.train.seed),
        load_model=lambda tok: load_reward_model(config.model, tok.pad_token_id,
                                                  config.quantization_in_force()))
    tokenizer, data, model = prepared.tokenizer, prepared.data, prepared.model
    share = shared_prefix_in_force(config.reward.share_prefix, "reward.share_prefix", model)

    result = train_recipe(prepared, config, module=RewardModule(model),
                          step_fn=reward_step(config.reward.center_coef, config.reward.use_margin),
                          collate=lambda pairs: collate_pairs(pairs, tokenizer.pad_token_id, share),
                          length=lambda pair: max(len(pair.chosen), len(pair.rejected)),
                          padded_length=(lambda pair: packed_length(pair.chosen, pair.rejected)) if share else None,
                          desc="rm", resume=resume, quiet=quiet)
    final = write_final(prepared.run, model, tokenizer, whole=result.module, config=config,
                        data=prepared.data)
    held = result.eval_metrics
    log(f"rm done: {result.steps} steps in {result.seconds:.1f}s"
        + (f"; held-out accuracy {held['accuracy']:.3f}, margin {held['margin']:.3f}" if held else "")
        + f"; model in {final}")
    return RMResult(prepared.run.path, final, result, data)

"""Critic-free RL with group baselines: GRPO (Shao et al., 2024) and RLOO (Ahmadian et al., 2024).

Each iteration samples K responses (`rl.num_generations`) to each of its prompts in one batched
generation, scores them, and gives every response one advantage from the rewards of its own group:
GRPO's (r - group mean) / group std (or unscaled, Dr. GRPO), or RLOO's leave-one-out baseline. There
is no value head and no critic. The policy then takes `rl.epochs` passes of the clipped objective over
minibatches of the responses; the KL to the frozen reference is a k3 term in the loss (GRPO), a
penalty folded into each reward (RLOO) or off, in which case no reference is loaded at all.

Old log-probs: the rows of the first minibatch of the first pass are learned from before any update,
so the policy that sampled them is the one being trained and their old log-probs are the new ones,
detached (ratio exactly 1). Only the other rows get a separate no-gradient pass, so one on-policy pass
over one minibatch (the default) forwards each response once with gradients and never without.

Groups never straddle processes: each process samples all K responses of its own prompts, so the
advantages need no communication; everything logged is over the whole batch of every process.
"""

from __future__ import annotations

import math
import time

import torch

from tunelab import distributed
from tunelab.config import GRPOConfig
from tunelab.distributed import log
from tunelab.loop import TrainingError
from tunelab.losses import group_advantages, group_policy_loss, masked_sum
from tunelab.modeling import load_lm
from tunelab.recipes.common import prepare_recipe
from tunelab.recipes.online import (OnlineLoop, OnlineResult, Step, check_batch_split, checked_scores, frozen_reference,
                                    planned_iterations, prepare_prompts, reference_logprobs, row_pieces,
                                    shape_scores, take_rows)
from tunelab.recipes.ppo import PolicyWithValueHead
from tunelab.rewards import load_reward_fn
from tunelab.rollout import Rollout
from tunelab.runlock import releasing
from tunelab.trackers import tracked


GroupRLResult = OnlineResult


def group_experience(loop: OnlineLoop, ref_model, rollout: Rollout, scores: torch.Tensor, config: GRPOConfig,
                     first_rows: torch.Tensor) -> dict:
    """Reference log-probs, the old log-probs the first update cannot supply, KL-shaped rewards, advantages.

    `first_rows`: this process's rows of the first minibatch of the first pass. Returns the `[B, T]`
    tensors (`old_logprobs` filled where `known_old`), `advantages [B]`, `known_old [B]`, `zero_spread [G]`.
    """
    rl, device = config.rl, loop.device
    batch = {"input_ids": rollout.input_ids.to(device), "attention_mask": rollout.attention_mask.to(device),
             "loss_mask": rollout.loss_mask.to(device)}
    mask = batch["loss_mask"].float()
    size = mask.shape[0]
    use_ref = rl.kl != "off" and rl.kl_coef > 0
    known_old = torch.ones(size, dtype=torch.bool, device=device)
    if rl.kl != "reward":  # the KL-shaped reward needs every row's old log-probs now
        known_old[first_rows.to(device)] = False
    old_logprobs, ref = torch.zeros_like(mask), torch.zeros_like(mask)
    with torch.no_grad():
        for rows, wanted in ((known_old.nonzero().flatten(), "old"), (torch.arange(size, device=device), "ref")):
            if wanted == "ref" and not use_ref:
                continue
            for index, columns in row_pieces(batch["attention_mask"], rows, loop.budget) if rows.numel() else []:
                piece = take_rows(batch, index, columns)
                if wanted == "old":
                    old_logprobs[index, columns] = loop.module(piece["input_ids"], piece["attention_mask"],
                                                               piece["loss_mask"])[0]
                else:
                    ref[index, columns] = reference_logprobs(loop.raw, ref_model, piece)
    if rl.kl == "reward" and use_ref:
        scores = scores - rl.kl_coef * ((old_logprobs - ref) * mask).sum(1)
    advantages, zero_spread = group_advantages(scores, rl.num_generations, rl.advantage, rl.scale_rewards)
    return {"tensors": {**batch, "mask": mask, "old_logprobs": old_logprobs, "ref_logprobs": ref},
            "advantages": advantages, "known_old": known_old, "zero_spread": zero_spread, "use_ref": use_ref,
            "shaped_scores": scores}


def learn_group(loop: OnlineLoop, experience: dict, config: GRPOConfig, first_order: torch.Tensor
                ) -> dict[str, float]:
    """`rl.epochs` passes of the clipped objective over minibatches of the rollout; mean loss and statistics.

    Each update's loss is the minibatch's mean over responses (`rl.loss_norm=sequence`) or over response
    tokens (`token`), counted over every process, so N processes make the update one process would.
    Fills in the old log-probs of the first minibatch from its own forward as it goes.
    """
    rl, module, accelerator = config.rl, loop.module, loop.accelerator
    world = accelerator.num_processes
    tensors, advantages, known = experience["tensors"], experience["advantages"], experience["known_old"]
    size = advantages.shape[0]
    local_minibatch = (rl.minibatch_size or size * world) // world
    in_loss = experience["use_ref"] and rl.kl == "loss"
    sums: dict[str, float] = {}
    updates = 0
    for epoch in range(rl.epochs):
        order = first_order if epoch == 0 else torch.randperm(size)
        for start in range(0, size, local_minibatch):
            rows = order[start:start + local_minibatch].to(advantages.device)
            lengths = tensors["mask"][rows].sum(1)
            count = (lengths > 0).sum() if rl.loss_norm == "sequence" else lengths.sum()
            total = distributed.all_sum(count.float()).clamp(min=1)
            pieces = row_pieces(tensors["attention_mask"], rows, loop.budget)
            stats: dict[str, torch.Tensor] = {}
            for i, (index, columns) in enumerate(pieces):
                take = take_rows(tensors, index, columns)
                # the forward too: DDP decides there whether this piece's backward synchronises gradients
                with distributed.micro_batch(accelerator, module, last=i == len(pieces) - 1):
                    logprobs, _, entropy = module(take["input_ids"], take["attention_mask"], take["loss_mask"])
                    fresh = ~known[index]
                    if fresh.any():  # sampled by the weights being trained: old = new, detached
                        old = torch.where(fresh[:, None], logprobs.detach(), take["old_logprobs"])
                        tensors["old_logprobs"][index[:, None], torch.arange(columns.start, columns.stop,
                                                                             device=old.device)] = old
                        known[index] = True
                    else:
                        old = take["old_logprobs"]
                    loss_sum, _, piece = group_policy_loss(logprobs, old, advantages[index], take["mask"],
                                                           rl.clip_range, take["ref_logprobs"] if in_loss else None,
                                                           rl.kl_coef, rl.loss_norm)
                    loss = loss_sum / total
                    accelerator.backward(loss * world)  # gradients are averaged over processes
                piece["entropy"] = masked_sum(entropy, take["mask"]).detach()
                piece["loss"] = loss.detach()
                for key, value in piece.items():
                    stats[key] = stats.get(key, 0.0) + value.float()
            keys = sorted(stats)
            reduced = dict(zip(keys, distributed.all_sum(torch.stack([stats[k] for k in keys])).tolist()))
            if not math.isfinite(reduced["loss"]):  # seen by every process, so all stop together
                raise TrainingError(f"the {loop.desc.upper()} loss became non-finite; try a lower learning rate or "
                                    "reward clipping (reward.clip)")
            loop.optimizer_step()
            tokens = max(reduced.pop("tokens"), 1.0)
            update = {"loss": reduced["loss"], "clip_fraction": reduced["clip_fraction"] / tokens,
                      "entropy": reduced["entropy"] / tokens}
            if "k3" in reduced:
                update["kl_k3"] = reduced["k3"] / tokens
            for key, value in update.items():
                sums[key] = sums.get(key, 0.0) + value
            updates += 1
    return {k: v / updates for k, v in sums.items()} | {"updates": updates}


def group_statistics(raw_scores: torch.Tensor, rollout: Rollout, experience: dict) -> dict[str, float]:
    """Logged statistics of one iteration over the whole rollout batch (all processes)."""
    tensors = experience["tensors"]
    mask = tensors["mask"]
    kl = ((tensors["old_logprobs"] - tensors["ref_logprobs"]) * mask).sum(1)
    per_row = torch.stack([raw_scores.to(mask.device), kl, rollout.response_lengths.float().to(mask.device),
                           rollout.ended.float().to(mask.device)], 1)
    rows = distributed.all_gather(per_row)
    spread = distributed.all_gather(experience["zero_spread"].float())
    scores = rows[:, 0]
    stats = {"score_mean": float(scores.mean()), "score_std": float(scores.std()) if scores.numel() > 1 else 0.0,
             "zero_spread_groups": float(spread.mean())}
    if experience["use_ref"]:
        stats["kl"] = float(rows[:, 1].mean())
    return stats | {"response_length": float(rows[:, 2].mean()), "eos_rate": float(rows[:, 3].mean())}


@releasing
@tracked
def run_group_rl(config: GRPOConfig, *, resume: bool = False, overwrite: bool = False, allow_changes: bool = False,
                 quiet: bool = False) -> GroupRLResult:
    """Run GRPO or RLOO iterations (train.max_steps of them) and write `final/` (the policy).

    `train.batch_size` prompts per iteration (a total over processes), each answered
    `rl.num_generations` times; `rl.minibatch_size` responses per optimizer step (default: all of them).
    """
    rl, train = config.rl, config.train
    name = type(config).__name__.removesuffix("Config").lower()
    world = distributed.world_size()
    responses = train.batch_size * rl.num_generations
    check_batch_split(world, train__batch_size=train.batch_size, rl__minibatch_size=rl.minibatch_size)
    if rl.minibatch_size and rl.minibatch_size > responses:
        raise TrainingError(f"rl.minibatch_size={rl.minibatch_size} is more than the {responses} responses of an "
                            f"iteration (train.batch_size {train.batch_size} x rl.num_generations "
                            f"{rl.num_generations})")
    reward_fn = load_reward_fn(config.reward.source, config.reward.label, config.reward.batch_size,
                               device=distributed.state().device)
    prepared = prepare_recipe(config, resume=resume, overwrite=overwrite,
                              allow_changes=allow_changes, task_type="CAUSAL_LM",
                              prepare_data=lambda tok: prepare_prompts(config, tok),
                              load_model=lambda tok: load_lm(config.model, config.quantization_in_force()))
    use_ref = rl.kl != "off" and rl.kl_coef > 0
    ref_model = frozen_reference(config) if use_ref else None
    module = PolicyWithValueHead(prepared.model, train.logprob_chunk, value_head=False)
    reference = ("none (no KL term)" if not use_ref else "frozen copy" if ref_model is not None
                 else "adapter disabled (no second copy)")
    log(f"reference: {reference}; KL: {rl.kl if use_ref else 'off'}; advantages: {rl.advantage} over groups of "
        f"{rl.num_generations}; no value head, no critic")
    minibatch = rl.minibatch_size or responses
    log(f"batch: {train.batch_size} prompts x {rl.num_generations} responses per iteration "
        f"({train.batch_size // world} prompts per process x {world}), minibatches of {minibatch} responses")
    iterations = planned_iterations(config, len(prepared.data.train))
    loop = OnlineLoop(config, prepared, module, total_updates=iterations * rl.epochs * math.ceil(responses / minibatch),
                      local_minibatch=minibatch // world, desc=name, resume=resume, quiet=quiet,
                      sample_every=rl.sample_every)
    if ref_model is not None:
        ref_model.to(loop.device)

    def step(prompts: list[str]) -> Step:
        started = time.time()
        rollout = loop.sample(prompts, repeats=rl.num_generations)
        generate_s = time.time() - started
        raw_scores = checked_scores(reward_fn(rollout.prompts, rollout.responses), len(rollout.prompts),
                                    config.reward.source)
        scores = shape_scores(raw_scores, rollout.ended, config, distributed.all_gather).to(loop.device)
        order = torch.randperm(len(rollout.prompts))
        first = order[:minibatch // world]
        experience = group_experience(loop, ref_model, rollout, scores, config, first)
        rollout_s = time.time() - started
        started = time.time()
        learned = learn_group(loop, experience, config, order)
        statistics = group_statistics(raw_scores, rollout, experience)
        record = {**statistics, **learned, "generate_s": round(generate_s, 3), "rollout_s": round(rollout_s, 3),
                  "learn_s": round(time.time() - started, 3)}
        return Step(record, rollout, raw_scores)

    history = loop.run(step)
    final = loop.finish()
    records = loop.records()  # the whole run's, also those logged before a resume
    if records:
        last = records[-1]
        log(f"{name} done: {loop.iteration} iterations; score {records[0]['score_mean']:.3f} -> "
            f"{last['score_mean']:.3f}" + (f", KL to reference {last['kl']:.3f}" if "kl" in last else "")
            + f"; policy in {final}")
    return GroupRLResult(prepared.run.path, final, loop.iteration, history)


def run_grpo(config: GRPOConfig, **options) -> GroupRLResult:
    return run_group_rl(config, **options)


def run_rloo(config, **options) -> GroupRLResult:
    return run_group_rl(config, **options)

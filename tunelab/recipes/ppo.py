"""RLHF with PPO: value head, GAE, clipped objective, KL penalty to a frozen reference.

One iteration has two halves:
  make experience:  sample responses -> score them -> policy, reference and value estimates of every
                    response token -> per-token rewards (score on the last token, -kl_coef * KL on
                    each) -> GAE advantages and returns;
  learn from it:    several epochs over minibatches of that experience with the clipped policy loss,
                    the clipped value loss and an optional entropy bonus.

Memory: the value function is a scalar head on the policy's own trunk (one forward gives log-probs,
entropy and values), and with LoRA the reference is the same base with the adapter disabled, so one
copy of the base weights serves all three roles. With full fine-tuning the reference is a frozen copy.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from tunelab import distributed
from tunelab.config import PPOConfig
from tunelab.distributed import log
from tunelab.logprobs import head_logprobs, hidden_states, trunk_and_head
from tunelab.loop import TrainingError
from tunelab.losses import (AdaptiveKLController, explained_variance, gae, kl_estimate, masked_mean, masked_whiten,
                            ppo_policy_loss, ppo_value_loss, token_rewards)
from tunelab.modeling import load_lm
from tunelab.recipes.common import prepare_recipe
from tunelab.recipes.online import (OnlineLoop, OnlineResult, Step, check_batch_split, checked_scores, frozen_reference,
                                    planned_iterations, prepare_prompts, reference_logprobs, row_pieces,
                                    shape_scores, take_rows)
from tunelab.rewards import load_reward_fn
from tunelab.rollout import Rollout
from tunelab.runlock import releasing
from tunelab.trackers import tracked


class PolicyWithValueHead(nn.Module):
    """A language model plus a value function: one forward gives log-probs, entropy and values.

    For an encoder-decoder the value head reads the decoder's hidden states (`tunelab.logprobs.hidden_states`).

    The value function is a scalar head on the policy's own trunk (the default), or a separate critic:
    a one-output sequence-classification model (e.g. the reward model) whose score head is applied
    at every position. With `value_head=False` and no critic there is no value function (critic-free
    RL): the values come back as None.
    """

    def __init__(self, policy: nn.Module, chunk_size: int = 2048, critic: nn.Module | None = None,
                 value_head: bool = True):
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.chunk_size = chunk_size
        self.autocast = contextlib.nullcontext  # the run's precision, set by the training loop
        self.value_head = None
        if critic is None and value_head:
            hidden = policy.get_input_embeddings().weight.shape[1]
            self.value_head = nn.Linear(hidden, 1)
            nn.init.normal_(self.value_head.weight, std=1 / math.sqrt(hidden + 1))
            nn.init.zeros_(self.value_head.bias)

    # FSDP's transformer auto-wrap reads the block classes to shard from the model it is given
    _no_split_modules = property(lambda self: getattr(self.policy, "_no_split_modules", None))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """`[B, T]` inputs -> (log-probs, values, entropy), each `[B, T]`, 0 where loss_mask is 0.

        The value of token t is estimated from the state before it (the hidden state at t - 1), the
        same position whose LM-head output gives t's log-prob.
        """
        _, head = trunk_and_head(self.policy)
        scored = loss_mask[:, 1:].bool()
        with self.autocast():
            hidden = hidden_states(self.policy, input_ids, attention_mask, loss_mask)
            picked = hidden[:, :-1][scored]
            logprob_entropy = head_logprobs(head, picked, input_ids[:, 1:][scored], self.chunk_size,
                                            with_entropy=True)
            if self.critic is not None:
                critic_hidden = hidden_states(self.critic, input_ids, attention_mask)[:, :-1][scored]
                critic_base = self.critic.get_base_model() if hasattr(self.critic, "get_base_model") else self.critic
                values = critic_base.score(critic_hidden)[:, 0]
            else:
                values = None
        if self.value_head is not None:  # outside autocast: a scalar regression keeps fp32
            values = self.value_head(picked.float()).squeeze(-1)

        def place(flat: torch.Tensor) -> torch.Tensor:
            full = torch.zeros(scored.shape, dtype=torch.float32, device=hidden.device)
            return F.pad(full.masked_scatter(scored, flat.float()), (1, 0))
        return (place(logprob_entropy[:, 0]), place(values) if values is not None else None,
                place(logprob_entropy[:, 1]))


def load_critic(config: PPOConfig, vocabulary_size: int) -> nn.Module:
    """The separate critic: the named reward model, wrapped with the run's PEFT method (head trained in full)."""
    from tunelab.generation import resolve_model_dir
    from tunelab.modeling import apply_peft, load_reward_model_for_inference

    critic, _ = load_reward_model_for_inference(resolve_model_dir(config.ppo.critic))
    if getattr(critic, "score", None) is None:
        raise TrainingError(f"critic {config.ppo.critic} has no per-token score head (an encoder cannot read "
                            "prefixes); use a reward model built on a causal LM")
    if critic.get_input_embeddings().weight.shape[0] != vocabulary_size:
        raise TrainingError(f"critic {config.ppo.critic} has a different vocabulary from the policy; a critic must "
                            "share the policy's tokenizer")
    critic.train()
    return apply_peft(critic, config, task_type="SEQ_CLS")


PPOResult = OnlineResult


def rollout_statistics(raw_scores: torch.Tensor, rollout: Rollout, experience: dict) -> dict[str, float]:
    """Logged statistics of one iteration over the whole rollout batch (all processes)."""
    mask = experience["mask"]
    per_row = torch.stack([raw_scores.to(mask.device), (experience["kl"] * mask).sum(1),
                           rollout.response_lengths.float().to(mask.device), rollout.ended.float().to(mask.device)], 1)
    rows = distributed.all_gather(per_row)
    scores = rows[:, 0]
    return {"score_mean": float(scores.mean()), "score_std": float(scores.std()) if scores.numel() > 1 else 0.0,
            "kl": float(rows[:, 1].mean()),
            "explained_variance": explained_variance(experience["values"], experience["returns"], mask,
                                                     distributed.all_sum),
            "response_length": float(rows[:, 2].mean()), "eos_rate": float(rows[:, 3].mean())}


@releasing
@tracked
def run_ppo(config: PPOConfig, *, resume: bool = False, overwrite: bool = False,
            allow_changes: bool = False, quiet: bool = False) -> PPOResult:
    """Run PPO iterations (train.max_steps of them) and write `final/` (the policy) into `config.output`.

    With N processes each iteration's prompts are shared out (`train.batch_size` is the total), each
    process samples, scores and learns from its share, and every statistic that normalises or decides
    (reward normalization, advantage whitening, the KL of the adaptive controller, the `target_kl` stop,
    the logged figures) is computed over the whole batch.
    """
    world = distributed.world_size()
    check_batch_split(world, train__batch_size=config.train.batch_size,
                      ppo__minibatch_size=config.ppo.minibatch_size)
    reward_fn = load_reward_fn(config.reward.source, config.reward.label, config.reward.batch_size,
                               device=distributed.state().device)
    prepared = prepare_recipe(config, resume=resume, overwrite=overwrite,
                              allow_changes=allow_changes, task_type="CAUSAL_LM",
                              prepare_data=lambda tok: prepare_prompts(config, tok),
                              load_model=lambda tok: load_lm(config.model, config.quantization_in_force()))
    policy = prepared.model
    train, ppo = config.train, config.ppo
    critic = load_critic(config, policy.get_input_embeddings().weight.shape[0]) if ppo.critic else None
    module = PolicyWithValueHead(policy, train.logprob_chunk, critic)
    ref_model = frozen_reference(config)
    log(f"reference: {'frozen copy' if ref_model is not None else 'adapter disabled (no second copy)'}; "
        f"value: {'critic initialised from ' + ppo.critic if critic is not None else 'scalar head on the policy trunk'}")
    log(f"batch: {train.batch_size} prompts per iteration ({train.batch_size // world} per process x {world}), "
        f"minibatches of {ppo.minibatch_size}")
    controller = AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
    iterations = planned_iterations(config, len(prepared.data.train))
    loop = OnlineLoop(config, prepared, module,
                      total_updates=iterations * ppo.epochs * math.ceil(train.batch_size / ppo.minibatch_size),
                      local_minibatch=ppo.minibatch_size // world, desc="ppo", resume=resume, quiet=quiet,
                      sample_every=ppo.sample_every, state=lambda: {"kl_coef": controller.value},
                      restore=lambda saved: setattr(controller, "value", saved["kl_coef"]))
    if ref_model is not None:
        ref_model.to(loop.device)

    def step(prompts: list[str]) -> Step:
        started = time.time()
        rollout = loop.sample(prompts)
        generate_s = time.time() - started
        raw_scores = checked_scores(reward_fn(rollout.prompts, rollout.responses), len(prompts),
                                    config.reward.source)
        scores = shape_scores(raw_scores, rollout.ended, config, distributed.all_gather).to(loop.device)
        order = torch.randperm(len(rollout.prompts))
        experience = make_experience(loop.module, loop.raw, ref_model, rollout, scores, controller.value, config,
                                     loop.device, loop.budget, first_rows=order[:ppo.minibatch_size // world],
                                     accelerator=loop.accelerator)
        rollout_s = time.time() - started
        started = time.time()
        learned = learn(loop, experience, order)
        statistics = rollout_statistics(raw_scores, rollout, experience)
        record = {"score_mean": statistics["score_mean"], "score_std": statistics["score_std"],
                  "kl": statistics["kl"], "kl_coef": controller.value, **learned,
                  "explained_variance": statistics["explained_variance"],
                  "response_length": statistics["response_length"], "eos_rate": statistics["eos_rate"],
                  "generate_s": round(generate_s, 3), "rollout_s": round(rollout_s, 3), "learn_s": round(time.time() - started, 3)}
        if ppo.adaptive_kl:
            controller.update(statistics["kl"], len(prompts) * world)
        return Step(record, rollout, raw_scores)

    history = loop.run(step)
    final = loop.finish()
    records = loop.records()  # the whole run's, also those logged before a resume
    if records:
        last = records[-1]
        log(f"ppo done: {loop.iteration} iterations; score {records[0]['score_mean']:.3f} -> "
            f"{last['score_mean']:.3f}, KL to reference {last['kl']:.3f}; policy in {final}")
    return PPOResult(prepared.run.path, final, loop.iteration, history)


def make_experience(module: nn.Module, raw: PolicyWithValueHead, ref_model: nn.Module | None, rollout: Rollout,
                    scores: torch.Tensor, kl_coef: float, config: PPOConfig, device: torch.device,
                    budget: int | None, first_rows: torch.Tensor | None = None, accelerator=None) -> dict:
    """Old log-probs, values, reference log-probs, KL, per-token rewards, advantages and returns.

    The forward passes run in micro-batches of at most `budget` padded tokens (`row_pieces`).
    `first_rows`: this process's rows of the first minibatch of the first epoch. The forward of the micro-batch
    of them that the first update runs first (the whole minibatch where it fits in one, else its piece of the
    longest rows) runs with gradients, after every other one: its outputs are those rows' old log-probs and
    values (detached; the weights are those that sampled them) and, kept as `first` with the piece's rows and
    columns, the first update's own forward of them, so they are forwarded once instead of twice. Only that
    piece's activations are held (within the micro-batch budget), and nothing else runs the model between that
    forward and its backward, which every engine (DDP, FSDP, ZeRO) allows. Where other pieces follow it, that
    forward runs as theirs do, without gradient synchronisation (`accelerator`'s `micro_batch`)."""
    batch = {"input_ids": rollout.input_ids.to(device), "attention_mask": rollout.attention_mask.to(device),
             "loss_mask": rollout.loss_mask.to(device)}
    mask = batch["loss_mask"].float()
    old_logprobs, values, ref = (torch.zeros_like(mask) for _ in range(3))
    rows = torch.arange(mask.shape[0], device=device)
    first = None
    if first_rows is not None:
        first_pieces = row_pieces(batch["attention_mask"], first_rows.to(device), budget)
        first = first_piece(first_pieces)
        rows = rows[~torch.isin(rows, first[0])]
    with torch.no_grad():
        for index, columns in row_pieces(batch["attention_mask"], rows, budget) if rows.numel() else []:
            piece = take_rows(batch, index, columns)
            piece_logprobs, piece_values, _ = module(piece["input_ids"], piece["attention_mask"], piece["loss_mask"])
            old_logprobs[index, columns] = piece_logprobs
            values[index, columns] = piece_values
        for index, columns in row_pieces(batch["attention_mask"], torch.arange(mask.shape[0], device=device), budget):
            ref[index, columns] = reference_logprobs(raw, ref_model, take_rows(batch, index, columns))
    outputs = None
    if first is not None:
        index, columns = first
        piece = take_rows(batch, index, columns)
        # DDP decides at the forward whether the backward synchronises: only the minibatch's last piece does
        with (distributed.micro_batch(accelerator, module, last=len(first_pieces) == 1) if accelerator is not None
              else contextlib.nullcontext()):
            outputs = module(piece["input_ids"], piece["attention_mask"], piece["loss_mask"])
        old_logprobs[index, columns] = outputs[0].detach()
        values[index, columns] = outputs[1].detach()
        outputs = (first, outputs)
    kl = kl_estimate(old_logprobs, ref, config.ppo.kl_estimator) * mask
    rewards = token_rewards(scores, kl, mask, kl_coef)
    advantages, returns = gae(rewards, values, mask, config.ppo.gamma, config.ppo.lam)
    if config.ppo.whiten_advantages:  # over the response tokens of every process
        advantages = masked_whiten(advantages, mask, all_sum=distributed.all_sum)
    return {**batch, "mask": mask, "old_logprobs": old_logprobs, "values": values, "kl": kl,
            "advantages": advantages, "returns": returns, "first": outputs}


def first_piece(pieces: list[tuple[torch.Tensor, slice]]) -> tuple[torch.Tensor, slice]:
    """The micro-batch of a minibatch that `learn` runs first: the one with the most padded tokens (the longest
    rows), whose forward `make_experience` may run with gradients ahead of it."""
    return max(pieces, key=lambda piece: len(piece[0]) * (piece[1].stop - piece[1].start))


def learn(loop: OnlineLoop, experience: dict, first_order: torch.Tensor) -> dict[str, float]:
    """PPO epochs over minibatches of one batch of experience; returns the mean losses and statistics.

    `first_order`: the row order of the first epoch, one of whose first minibatch's micro-batches
    (`first_piece`) `make_experience` may have forwarded already (`experience["first"]`: the piece and its
    outputs); that piece then runs first.
    Each process takes `ppo.minibatch_size / N` of its rows per update; losses are means over the
    response tokens of the whole minibatch (all processes), and so are the statistics, so every process
    makes the same `target_kl` decision.
    """
    module, accelerator, budget, ppo = loop.module, loop.accelerator, loop.budget, loop.config.ppo
    tensors = {k: v for k, v in experience.items() if k != "first"}
    first = experience["first"]
    world = accelerator.num_processes
    size = experience["input_ids"].shape[0]
    local_minibatch = ppo.minibatch_size // world
    sums: dict[str, float] = {}
    updates = 0
    for epoch in range(ppo.epochs):
        epoch_kl, epoch_updates = 0.0, 0
        order = first_order if epoch == 0 else torch.randperm(size)
        for start in range(0, size, local_minibatch):
            rows = order[start:start + local_minibatch].to(experience["mask"].device)
            total = distributed.all_sum(experience["mask"][rows].sum()).clamp(min=1)
            pieces = row_pieces(experience["attention_mask"], rows, budget)
            if first is not None:  # the piece make_experience forwarded goes first: its graph is waiting
                (held_rows, held_columns), _ = first
                at = [i for i, (index, columns) in enumerate(pieces)
                      if columns == held_columns and torch.equal(index, held_rows)]
                if at:
                    pieces.insert(0, pieces.pop(at[0]))
                else:  # not this minibatch's piece (cannot happen with the same order and budget): recompute
                    first = None
            stats: dict[str, torch.Tensor] = {}
            for i, (index, columns) in enumerate(pieces):
                # each piece's masked means, weighted by its share of the minibatch's response tokens,
                # add up to the minibatch's masked means: the same loss and gradient as one pass
                take = take_rows(tensors, index, columns)
                weight = take["mask"].sum() / total
                # the forward too: DDP decides there whether this piece's backward synchronises gradients
                with distributed.micro_batch(accelerator, module, last=i == len(pieces) - 1):
                    if first is not None:  # the first update's forward of this piece, run by make_experience
                        (_, (logprobs, values, entropy)), first = first, None
                    else:
                        logprobs, values, entropy = module(take["input_ids"], take["attention_mask"],
                                                           take["loss_mask"])
                    policy_loss, policy_stats = ppo_policy_loss(logprobs, take["old_logprobs"], take["advantages"],
                                                                take["mask"], ppo.clip_range)
                    value_loss, value_stats = ppo_value_loss(values, take["values"], take["returns"], take["mask"],
                                                             ppo.value_clip)
                    mean_entropy = masked_mean(entropy, take["mask"])
                    loss = (policy_loss + ppo.vf_coef * value_loss - ppo.entropy_coef * mean_entropy) * weight
                    # gradients are averaged over processes: each contributes world x its share
                    accelerator.backward(loss * world)
                piece_stats = {"loss": loss, "policy_loss": policy_loss, "value_loss": value_loss,
                               "entropy": mean_entropy, **policy_stats, **value_stats}
                for key, value in piece_stats.items():
                    stats[key] = stats.get(key, 0.0) + value.detach() * (1 if key == "loss" else weight)
            keys = sorted(stats)
            reduced = distributed.all_sum(torch.stack([stats[k].float() for k in keys]))
            stats = dict(zip(keys, reduced.tolist()))
            if not math.isfinite(stats.pop("loss")):  # seen by every process, so all stop together
                raise TrainingError("the PPO loss became non-finite; try a lower learning rate, reward clipping "
                                    "(reward.clip) or normalization (reward.normalize=true)")
            loop.optimizer_step()
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
            epoch_kl += stats["approx_kl"]
            epoch_updates += 1
            updates += 1
        if ppo.target_kl is not None and epoch_kl / epoch_updates > ppo.target_kl:
            break  # the policy moved far enough from the one that sampled the data
    return {k: v / updates for k, v in sums.items()} | {"updates": updates}

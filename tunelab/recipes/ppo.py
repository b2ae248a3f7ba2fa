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

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunelab import distributed
from tunelab.checkpoint import load_checkpoint, save_checkpoint, trim_jsonl
from tunelab.config import ModelConfig, PPOConfig
from tunelab.data.dataset import prepare_data
from tunelab.data.formats import Example
from tunelab.data.templates import prompt_text
from tunelab.logprobs import head_logprobs, hidden_states, token_logprobs, trunk_and_head
from tunelab.loop import Progress, TrainingError, build_optimizer, lr_factor
from tunelab.losses import (AdaptiveKLController, explained_variance, gae, kl_estimate, masked_mean, masked_whiten,
                            ppo_policy_loss, ppo_value_loss, token_rewards)
from tunelab.modeling import adapter_disabled, load_causal_lm
from tunelab.distributed import log
from tunelab.recipes.common import batch_plan, micro_batch_budget, prepare_recipe, split_by_tokens, write_final
from tunelab.report import report_at_end
from tunelab.rewards import load_reward_fn
from tunelab.rollout import LengthSampler, Rollout, sample_rollouts

PROMPT_FORMATS = ("prompt", "prompt_completion", "alpaca", "messages")


class PolicyWithValueHead(nn.Module):
    """A causal LM plus a value function: one forward gives log-probs, entropy and values.

    The value function is a scalar head on the policy's own trunk (the default), or a separate critic:
    a one-output sequence-classification model (e.g. the reward model) whose score head is applied
    at every position.
    """

    def __init__(self, policy: nn.Module, chunk_size: int = 2048, critic: nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.chunk_size = chunk_size
        if critic is None:
            hidden = policy.get_input_embeddings().weight.shape[1]
            self.value_head = nn.Linear(hidden, 1)
            nn.init.normal_(self.value_head.weight, std=1 / math.sqrt(hidden + 1))
            nn.init.zeros_(self.value_head.bias)

    # FSDP's transformer auto-wrap reads the block classes to shard from the model it is given
    _no_split_modules = property(lambda self: getattr(self.policy, "_no_split_modules", None))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`[B, T]` inputs -> (log-probs, values, entropy), each `[B, T]`, 0 where loss_mask is 0.

        The value of token t is estimated from the state before it (the hidden state at t - 1), the
        same position whose LM-head output gives t's log-prob.
        """
        _, head = trunk_and_head(self.policy)
        hidden = hidden_states(self.policy, input_ids, attention_mask)
        scored = loss_mask[:, 1:].bool()
        picked = hidden[:, :-1][scored]
        logprob_entropy = head_logprobs(head, picked, input_ids[:, 1:][scored], self.chunk_size, with_entropy=True)
        if self.critic is None:
            values = self.value_head(picked.float()).squeeze(-1)
        else:
            critic_hidden = hidden_states(self.critic, input_ids, attention_mask)[:, :-1][scored]
            critic_base = self.critic.get_base_model() if hasattr(self.critic, "get_base_model") else self.critic
            values = critic_base.score(critic_hidden)[:, 0]

        def place(flat: torch.Tensor) -> torch.Tensor:
            full = torch.zeros(scored.shape, dtype=torch.float32, device=hidden.device)
            return F.pad(full.masked_scatter(scored, flat.float()), (1, 0))
        return place(logprob_entropy[:, 0]), place(values), place(logprob_entropy[:, 1])


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


@dataclass
class PPOResult:
    run_dir: Path
    final_dir: Path
    iterations: int
    history: list[dict] = field(default_factory=list)


def prepare_prompts(config: PPOConfig, tokenizer):
    """Prompt texts from prompt-only, prompt/completion, alpaca or messages rows (completions unused)."""
    data_config = config.data

    def render(example: Example):
        prompt = example.prompt
        if example.format == "messages":
            turns = example.messages
            prompt = turns[:-1] if turns[-1]["role"] == "assistant" else turns
        text = prompt_text(prompt, tokenizer, data_config.chat_template, example.where)
        if not text.strip():
            return None, "dropped_empty"
        if len(tokenizer(text)["input_ids"]) > data_config.max_length:
            return None, "dropped_long"  # a cut prompt asks a different question: drop, never truncate
        return text, "kept"

    return prepare_data(data_config, render, PROMPT_FORMATS, "PPO", config.train.seed)


def reference_logprobs(policy: nn.Module, ref_model: nn.Module | None, batch: dict, chunk: int) -> torch.Tensor:
    """Reference log-probs of the response tokens: a frozen copy, or the policy with its adapter disabled."""
    with torch.no_grad():
        if ref_model is not None:  # a frozen copy outside the engine: gathered whole where ZeRO-3 split it
            with distributed.gathered(ref_model):
                return token_logprobs(ref_model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                      chunk)
        with adapter_disabled(policy) as base:
            return token_logprobs(base, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], chunk)


def shape_scores(scores: torch.Tensor, ended: torch.Tensor, config: PPOConfig, gather=None) -> torch.Tensor:
    """Apply the missing-EOS penalty, clipping and normalization to raw scores `[B]`.

    `gather`, when given, collects the scores of every process, so normalization uses the statistics
    of the whole rollout batch rather than one process's share.
    """
    reward = config.reward
    if reward.missing_eos_penalty is not None:
        scores = scores + reward.missing_eos_penalty * (~ended).float()
    if reward.clip is not None:
        scores = scores.clamp(-reward.clip, reward.clip)
    whole = gather(scores) if gather is not None else scores
    if reward.normalize and whole.numel() > 1:
        scores = (scores - whole.mean()) / (whole.std() + 1e-8)
    return scores


def check_batch_split(config: PPOConfig, world: int) -> None:
    """Prompts per iteration and per minibatch are totals over processes: each must split evenly."""
    for name, value in (("train.batch_size", config.train.batch_size), ("ppo.minibatch_size", config.ppo.minibatch_size)):
        if value % world:
            raise TrainingError(f"{name}={value} prompts cannot be shared evenly by {world} processes; make it a "
                                f"multiple of {world}")


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


def run_ppo(config: PPOConfig, *, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> PPOResult:
    """Run PPO iterations (train.max_steps of them) and write `final/` (the policy) into `config.output`.

    With N processes each iteration's prompts are shared out (`train.batch_size` is the total), each
    process samples, scores and learns from its share, and every statistic that normalises or decides
    (reward normalization, advantage whitening, the KL of the adaptive controller, the `target_kl` stop,
    the logged figures) is computed over the whole batch.
    """
    from accelerate import Accelerator

    world, rank = distributed.world_size(), distributed.rank()
    check_batch_split(config, world)
    reward_fn = load_reward_fn(config.reward.source, config.reward.label, config.reward.batch_size,
                               device=distributed.state().device)
    prepared = prepare_recipe(config, resume=resume, overwrite=overwrite, task_type="CAUSAL_LM",
                              prepare_data=lambda tok: prepare_prompts(config, tok),
                              load_model=lambda tok: load_causal_lm(config.model, config.quantization_in_force()))
    tokenizer, data, policy, run = prepared.tokenizer, prepared.data, prepared.model, prepared.run
    train, ppo, gen = config.train, config.ppo, config.generation
    chunk = train.logprob_chunk
    critic = load_critic(config, policy.get_input_embeddings().weight.shape[0]) if ppo.critic else None
    module = PolicyWithValueHead(policy, chunk, critic)
    ref_model = None
    if config.peft == "none":
        ref_model = load_causal_lm(ModelConfig(name_or_path=config.model.name_or_path, dtype=config.model.dtype,
                                               trust_remote_code=config.model.trust_remote_code))
        ref_model.requires_grad_(False).eval()
    log(f"reference: {'frozen copy' if ref_model is not None else 'adapter disabled (no second copy)'}; "
        f"value: {'critic initialised from ' + ppo.critic if critic is not None else 'scalar head on the policy trunk'}")
    log(f"batch: {train.batch_size} prompts per iteration ({train.batch_size // world} per process x {world}), "
        f"minibatches of {ppo.minibatch_size}")

    iterations = train.max_steps or max(1, math.ceil(train.epochs * math.ceil(len(data.train) / train.batch_size)))
    minibatches = math.ceil(train.batch_size / ppo.minibatch_size)
    total_updates = iterations * ppo.epochs * minibatches
    accelerator = Accelerator()
    optimizer = build_optimizer([p for p in module.parameters() if p.requires_grad], config.resolved_lr(),
                                train.weight_decay, accelerator.device)
    warmup = math.ceil(train.warmup_ratio * total_updates)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total_updates, train.schedule))
    controller = AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
    deepspeed = distributed.uses_deepspeed(accelerator)
    if deepspeed:
        distributed.configure_deepspeed(accelerator, ppo.minibatch_size // world, train.max_grad_norm)
    module, optimizer = accelerator.prepare(module, optimizer)
    raw = accelerator.unwrap_model(module)
    iteration, epoch, position = 0, 0, 0
    if resume:
        state = load_checkpoint(run.latest_checkpoint(), raw, optimizer, scheduler,
                                engine=module if deepspeed else None)
        iteration, epoch, position, controller.value = state["step"], state["epoch"], state["position"], \
            state["kl_coef"]
        if accelerator.is_main_process:
            run.trim_metrics(iteration)
            trim_jsonl(run.path / "samples.jsonl", iteration)
        log(f"resumed at iteration {iteration}/{iterations}")
    params = [p for p in module.parameters() if p.requires_grad]
    device = accelerator.device
    if ref_model is not None:
        ref_model.to(device)
    # dropout stays off throughout: the old log-probs of the rollout and the new ones of the first
    # epoch must agree exactly before any update, or the ratio is noise
    module.eval()
    if rank and not resume:  # every process samples from its own stream; the main one keeps one process's
        torch.manual_seed(distributed.derived_seed(train.seed, "rollout", rank))
    plan = batch_plan(data, [1] * len(data.train), config)
    # sharded weights need every process in every forward pass: one pass per minibatch instead of
    # length-cut micro-batches, whose number differs between processes
    lockstep = deepspeed or distributed.in_lockstep(module)
    budget = micro_batch_budget(config, raw.policy, device) if not lockstep else None
    lengths = LengthSampler(gen.length_sampler_min or gen.max_new_tokens, gen.max_new_tokens)
    progress = Progress(iterations, iteration, quiet, train.log_every, "ppo")
    history: list[dict] = []

    def checkpoint_now() -> None:
        save_checkpoint(run, iteration, raw, optimizer, scheduler,
                        {"epoch": epoch, "position": position, "kl_coef": controller.value}, train.keep_last,
                        engine=module if deepspeed else None)

    try:
        while iteration < iterations:
            batches = plan(epoch)
            if position >= len(batches):
                epoch, position = epoch + 1, 0
                continue
            share = len(batches[position]) // world  # a short last batch is shared evenly too
            prompts = [data.train[i] for i in batches[position][rank * share:(rank + 1) * share]]
            rng = random.Random(f"{train.seed}-length-{iteration}")  # the same length limit on every process
            started = time.time()
            with distributed.gathered(raw, generation=True):  # a sharded policy generates with whole weights
                rollout = sample_rollouts(raw.policy, tokenizer, prompts, max_new_tokens=lengths(rng),
                                          min_new_tokens=gen.min_new_tokens, temperature=gen.temperature,
                                          top_k=gen.top_k, top_p=gen.top_p,
                                          repetition_penalty=gen.repetition_penalty)
            raw_scores = torch.tensor(reward_fn(rollout.prompts, rollout.responses), dtype=torch.float32)
            scores = shape_scores(raw_scores, rollout.ended, config, distributed.all_gather).to(device)
            experience = make_experience(module, raw, ref_model, rollout, scores, controller.value, config, device,
                                         budget)
            rollout_s = time.time() - started
            started = time.time()
            learned = learn(module, experience, optimizer, scheduler, accelerator, params, config, budget)
            learn_s = time.time() - started
            iteration, position = iteration + 1, position + 1
            statistics = rollout_statistics(raw_scores, rollout, experience)
            record = {"step": iteration, "score_mean": statistics["score_mean"], "score_std": statistics["score_std"],
                      "kl": statistics["kl"], "kl_coef": controller.value, **learned,
                      "explained_variance": statistics["explained_variance"],
                      "response_length": statistics["response_length"], "eos_rate": statistics["eos_rate"],
                      "rollout_s": round(rollout_s, 3), "learn_s": round(learn_s, 3),
                      "lr": scheduler.get_last_lr()[0]}
            if ppo.adaptive_kl:
                controller.update(statistics["kl"], share * world)
            history.append(record)
            if accelerator.is_main_process:
                with run.metrics.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                if ppo.sample_every and (iteration % ppo.sample_every == 0 or iteration == 1):
                    _log_samples(run, progress, iteration, rollout, raw_scores)
            progress.update(iteration, score=record["score_mean"], kl=record["kl"])
            if train.save_every and iteration % train.save_every == 0:
                checkpoint_now()
    except KeyboardInterrupt:
        progress.close()
        checkpoint_now()
        log(f"\ninterrupted at iteration {iteration}: checkpoint saved in {run.checkpoints}; rerun with --resume")
        raise
    progress.close()
    final = write_final(run, policy, tokenizer, whole=raw)
    if accelerator.is_main_process:
        report_at_end(run.path, train.report)
    if history:
        last = history[-1]
        log(f"ppo done: {iteration} iterations; score {history[0]['score_mean']:.3f} -> {last['score_mean']:.3f}, "
            f"KL to reference {last['kl']:.3f}; policy in {final}")
    return PPOResult(run.path, final, iteration, history)


def row_pieces(attention_mask: torch.Tensor, rows: torch.Tensor, budget: int | None
               ) -> list[tuple[torch.Tensor, slice]]:
    """Split `rows` of a rollout into micro-batches of at most `budget` padded tokens.

    Each piece is (its rows, the columns they use): rows of similar length go together and the columns
    that are padding in every row of the piece are cut, so a piece of short prompts no longer carries the
    left padding of the batch's longest one. Positions are counted over real tokens, so cutting padding
    columns changes nothing for the real ones.
    """
    lengths = attention_mask.sum(1).tolist()
    pieces = []
    for group in split_by_tokens(rows.tolist(), lengths, budget):
        index = torch.tensor(group, device=attention_mask.device)
        used = attention_mask[index].any(0).nonzero().flatten().tolist()
        pieces.append((index, slice(used[0], used[-1] + 1)))
    return pieces


def _take(batch: dict, index: torch.Tensor, columns: slice) -> dict:
    return {k: v[index][:, columns] for k, v in batch.items()}


def make_experience(module: nn.Module, raw: PolicyWithValueHead, ref_model: nn.Module | None, rollout: Rollout,
                    scores: torch.Tensor, kl_coef: float, config: PPOConfig, device: torch.device,
                    budget: int | None) -> dict:
    """Old log-probs, values, reference log-probs, KL, per-token rewards, advantages and returns.

    The forward passes run in micro-batches of at most `budget` padded tokens (`row_pieces`)."""
    batch = {"input_ids": rollout.input_ids.to(device), "attention_mask": rollout.attention_mask.to(device),
             "loss_mask": rollout.loss_mask.to(device)}
    mask = batch["loss_mask"].float()
    old_logprobs, values, ref = (torch.zeros_like(mask) for _ in range(3))
    rows = torch.arange(mask.shape[0], device=device)
    with torch.no_grad():
        for index, columns in row_pieces(batch["attention_mask"], rows, budget):
            piece = _take(batch, index, columns)
            piece_logprobs, piece_values, _ = module(piece["input_ids"], piece["attention_mask"], piece["loss_mask"])
            old_logprobs[index, columns] = piece_logprobs
            values[index, columns] = piece_values
            ref[index, columns] = reference_logprobs(raw.policy, ref_model, piece, raw.chunk_size)
    kl = kl_estimate(old_logprobs, ref, config.ppo.kl_estimator) * mask
    rewards = token_rewards(scores, kl, mask, kl_coef)
    advantages, returns = gae(rewards, values, mask, config.ppo.gamma, config.ppo.lam)
    if config.ppo.whiten_advantages:  # over the response tokens of every process
        advantages = masked_whiten(advantages, mask, all_sum=distributed.all_sum)
    return {**batch, "mask": mask, "old_logprobs": old_logprobs, "values": values, "kl": kl,
            "advantages": advantages, "returns": returns}


def learn(module: nn.Module, experience: dict, optimizer, scheduler, accelerator, params: list,
          config: PPOConfig, budget: int | None) -> dict[str, float]:
    """PPO epochs over minibatches of one batch of experience; returns the mean losses and statistics.

    Each process takes `ppo.minibatch_size / N` of its rows per update; losses are means over the
    response tokens of the whole minibatch (all processes), and so are the statistics, so every process
    makes the same `target_kl` decision.
    """
    ppo, train = config.ppo, config.train
    world = accelerator.num_processes
    size = experience["input_ids"].shape[0]
    local_minibatch = ppo.minibatch_size // world
    sums: dict[str, float] = {}
    updates = 0
    for _ in range(ppo.epochs):
        epoch_kl, epoch_updates = 0.0, 0
        order = torch.randperm(size)
        for start in range(0, size, local_minibatch):
            rows = order[start:start + local_minibatch].to(experience["mask"].device)
            total = distributed.all_sum(experience["mask"][rows].sum()).clamp(min=1)
            pieces = row_pieces(experience["attention_mask"], rows, budget)
            stats: dict[str, torch.Tensor] = {}
            for i, (index, columns) in enumerate(pieces):
                # each piece's masked means, weighted by its share of the minibatch's response tokens,
                # add up to the minibatch's masked means: the same loss and gradient as one pass
                take = _take(experience, index, columns)
                weight = take["mask"].sum() / total
                logprobs, values, entropy = module(take["input_ids"], take["attention_mask"], take["loss_mask"])
                policy_loss, policy_stats = ppo_policy_loss(logprobs, take["old_logprobs"], take["advantages"],
                                                            take["mask"], ppo.clip_range)
                value_loss, value_stats = ppo_value_loss(values, take["values"], take["returns"], take["mask"],
                                                         ppo.value_clip)
                mean_entropy = masked_mean(entropy, take["mask"])
                loss = (policy_loss + ppo.vf_coef * value_loss - ppo.entropy_coef * mean_entropy) * weight
                with distributed.micro_batch(accelerator, module, last=i == len(pieces) - 1):
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
            if train.max_grad_norm:
                accelerator.clip_grad_norm_(params, train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
            epoch_kl += stats["approx_kl"]
            epoch_updates += 1
            updates += 1
        if ppo.target_kl is not None and epoch_kl / epoch_updates > ppo.target_kl:
            break  # the policy moved far enough from the one that sampled the data
    return {k: v / updates for k, v in sums.items()} | {"updates": updates}


def _log_samples(run, progress: Progress, iteration: int, rollout: Rollout, scores: torch.Tensor, n: int = 3) -> None:
    """A few prompt/response/score samples to the log and to samples.jsonl."""
    with (run.path / "samples.jsonl").open("a") as handle:
        for prompt, response, score in list(zip(rollout.prompts, rollout.responses, scores.tolist()))[:n]:
            handle.write(json.dumps({"step": iteration, "prompt": prompt, "response": response, "score": score}) + "\n")
            progress.write(f"[iteration {iteration}] score {score:+.3f} | {prompt[-60:]!r} -> {response[:100]!r}")

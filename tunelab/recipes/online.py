"""Online RL: what PPO and the critic-free recipes (GRPO, RLOO) share.

Each iteration takes `train.batch_size` prompts (a total over processes), samples responses with the
current policy, scores them and learns from them. The loop around that (the optimizer and its
schedule, the process group, resume, checkpoints, metrics.jsonl, samples.jsonl, progress, Ctrl-C,
final/ and the report) is `OnlineLoop`; a recipe hands it one function, `step(prompts)`, that does
the sampling, scoring and learning of one iteration and returns what to log.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from tunelab import distributed, pause, precision, stopping, trackers
from tunelab.checkpoint import checkpoint_to_resume, load_checkpoint, save_checkpoint
from tunelab.config import ModelConfig
from tunelab.data.dataset import prepare_data
from tunelab.data.formats import Example
from tunelab.data.templates import prompt_text
from tunelab.distributed import log
from tunelab.logprobs import token_logprobs
from tunelab.jsonlog import read_jsonl, trim_jsonl
from tunelab.loop import (Progress, TrainingError, append_log, build_optimizer, check_grad_norm, check_weights,
                          lr_factor)
from tunelab.modeling import adapter_disabled, load_lm
from tunelab.recipes.common import (Prepared, batch_plan, micro_batch_budget, model_export, split_by_tokens,
                                    write_final)
from tunelab.report import report_at_end
from tunelab.rollout import LengthSampler, Rollout, sample_rollouts
from tunelab.rewards import checked_rewards

PROMPT_FORMATS = ("prompt", "prompt_completion", "alpaca", "messages", "preference")


def prepare_prompts(config, tokenizer):
    """Prompt texts from prompt-only, prompt/completion, alpaca, messages or preference rows (completions and
    responses unused; a preference row's prompt is the turns its two sides share)."""
    data_config = config.data

    def render(example: Example):
        prompt = example.prompt
        if example.format == "messages":
            turns = example.messages
            prompt = turns[:-1] if turns[-1]["role"] == "assistant" else turns
        if not prompt:
            return None, "dropped_empty"
        text = prompt_text(prompt, tokenizer, data_config.chat_template, example.where, example.tools)
        if not text.strip():
            return None, "dropped_empty"
        if len(tokenizer(text)["input_ids"]) > data_config.max_length:
            return None, "dropped_long"  # a cut prompt asks a different question: drop, never truncate
        return text, "kept"

    return prepare_data(data_config, render, PROMPT_FORMATS, type(config).__name__.removesuffix("Config"),
                        config.train.seed)


def check_batch_split(world: int, **totals: int | None) -> None:
    """Prompts per iteration and rows per minibatch are totals over processes: each must split evenly.

    `totals` maps config keys (`train__batch_size` for `train.batch_size`) to their values."""
    for key, value in totals.items():
        if value is not None and value % world:
            raise TrainingError(f"{key.replace('__', '.')}={value} cannot be shared evenly by {world} processes; "
                                f"make it a multiple of {world}")


def frozen_reference(config) -> nn.Module | None:
    """The frozen reference of full fine-tuning (a second copy); None with PEFT (the adapter is disabled)."""
    if config.peft != "none":
        return None
    ref_model = load_lm(ModelConfig(name_or_path=config.model.name_or_path, dtype=config.model.dtype,
                                           trust_remote_code=config.model.trust_remote_code))
    return ref_model.requires_grad_(False).eval()


def reference_logprobs(raw: nn.Module, ref_model: nn.Module | None, batch: dict) -> torch.Tensor:
    """Reference log-probs of the response tokens: a frozen copy, or the policy of `raw` (the unwrapped
    PolicyWithValueHead) with its adapter disabled; in the run's precision."""
    with torch.no_grad(), raw.autocast():
        if ref_model is not None:  # a frozen copy outside the engine: gathered whole where ZeRO-3 split it
            with distributed.gathered(ref_model):
                return token_logprobs(ref_model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                      raw.chunk_size).float()
        with adapter_disabled(raw.policy) as base:
            return token_logprobs(base, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                  raw.chunk_size).float()


def checked_scores(values, count: int, source: str) -> torch.Tensor:
    """The reward source's output as a float tensor `[count]`, or an error saying what was wrong with it."""
    return torch.tensor(checked_rewards(values, count, source), dtype=torch.float32)


def shape_scores(scores: torch.Tensor, ended: torch.Tensor, config, gather=None) -> torch.Tensor:
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


def take_rows(batch: dict, index: torch.Tensor, columns: slice) -> dict:
    """Rows `index` and columns `columns` of every `[B, T]` tensor of a batch."""
    return {k: v[index][:, columns] for k, v in batch.items()}


def planned_iterations(config, prompts: int) -> int:
    """Iterations of a run: `train.max_steps`, or `train.epochs` passes over `prompts` prompts."""
    train = config.train
    return train.max_steps or max(1, math.ceil(train.epochs * math.ceil(prompts / train.batch_size)))


@dataclass
class OnlineResult:
    """What an online RL run hands back: its directory, final/, iterations done and their records."""

    run_dir: Path
    final_dir: Path
    iterations: int
    history: list[dict] = field(default_factory=list)


@dataclass
class Step:
    """What one iteration hands back to the loop: its record for metrics.jsonl, and the samples to show."""

    record: dict
    rollout: Rollout
    scores: torch.Tensor


class OnlineLoop:
    """The iteration loop of an online RL recipe, around a `step(prompts) -> Step` function.

    Builds AdamW and its schedule over `total_updates` optimizer steps, prepares `module` with accelerate
    (DDP, FSDP2 or DeepSpeed; `local_minibatch` rows per process per update), resumes from the newest
    checkpoint (with the recipe's own saved values: `state()` to save, `restore(saved)` to load), and then
    runs `train.max_steps` iterations. Dropout stays off throughout: the log-probs of the sampling policy
    and those of the first update must agree exactly before any update, or the ratio is noise.
    """

    def __init__(self, config, prepared: Prepared, module: nn.Module, *, total_updates: int, local_minibatch: int,
                 desc: str, resume: bool, quiet: bool, sample_every: int, state: Callable[[], dict] = dict,
                 restore: Callable[[dict], None] = lambda saved: None):
        from accelerate import Accelerator

        train = config.train
        self.config, self.prepared, self.desc, self.sample_every = config, prepared, desc, sample_every
        self.state, self.world, self.rank = state, distributed.world_size(), distributed.rank()
        self.iterations = planned_iterations(config, len(prepared.data.train))
        self.accelerator = accelerator = Accelerator()
        optimizer = build_optimizer([p for p in module.parameters() if p.requires_grad], config.resolved_lr(),
                                    train.weight_decay, accelerator.device)
        warmup = math.ceil(train.warmup_ratio * total_updates)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, warmup, total_updates, train.schedule))
        self.deepspeed = distributed.uses_deepspeed(accelerator)
        if self.deepspeed:
            distributed.configure_deepspeed(accelerator, local_minibatch, train.max_grad_norm)
        self.module, self.optimizer = accelerator.prepare(module, optimizer)
        self.raw = accelerator.unwrap_model(self.module)
        self.iteration, self.epoch, self.position = 0, 0, 0
        run = prepared.run
        if resume:
            saved = load_checkpoint(checkpoint_to_resume(run), self.raw, self.optimizer, self.scheduler,
                                    engine=self.module if self.deepspeed else None)
            self.iteration, self.epoch, self.position = saved["step"], saved["epoch"], saved["position"]
            restore(saved)
            if accelerator.is_main_process:
                run.trim_metrics(self.iteration)
                trim_jsonl(run.path / "samples.jsonl", self.iteration)
            log(f"resumed at iteration {self.iteration}/{self.iterations}")
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.device = accelerator.device
        chosen, said = precision.resolve(train.precision, self.device)
        log(said)
        self.raw.autocast = lambda: precision.autocast(chosen, self.device)
        self.module.eval()
        if self.rank and not resume:  # every process samples from its own stream; the main one keeps one process's
            torch.manual_seed(distributed.derived_seed(train.seed, "rollout", self.rank))
        self.plan = batch_plan(prepared.data, [1] * len(prepared.data.train), config)
        # sharded weights need every process in every forward pass: one pass per minibatch instead of
        # length-cut micro-batches, whose number differs between processes
        lockstep = self.deepspeed or distributed.in_lockstep(self.module)
        self.budget = micro_batch_budget(config, self.raw.policy, self.device) if not lockstep else None
        gen = config.generation
        self.lengths = LengthSampler(gen.length_sampler_min or gen.max_new_tokens, gen.max_new_tokens)
        self.progress = Progress(self.iterations, self.iteration, quiet, train.log_every, desc)

    def sample(self, prompts: list[str], repeats: int = 1) -> Rollout:
        """Responses of the current policy, `repeats` per prompt (each prompt's rows consecutive)."""
        gen = self.config.generation
        rng = random.Random(f"{self.config.train.seed}-length-{self.iteration}")  # one length limit on every process
        with distributed.gathered(self.raw, generation=True):  # a sharded policy generates with whole weights
            return sample_rollouts(self.raw.policy, self.prepared.tokenizer,
                                   [p for p in prompts for _ in range(repeats)], max_new_tokens=self.lengths(rng),
                                   min_new_tokens=gen.min_new_tokens, temperature=gen.temperature, top_k=gen.top_k,
                                   top_p=gen.top_p, repetition_penalty=gen.repetition_penalty)

    def optimizer_step(self) -> None:
        """Clip, step, advance the schedule, clear the gradients."""
        if self.config.train.max_grad_norm:
            norm = self.accelerator.clip_grad_norm_(self.params, self.config.train.max_grad_norm)
            check_grad_norm(float(norm) if norm is not None else None, self.iteration + 1, self.prepared.run,
                            "iteration")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        pause.at("optimizer")

    def checkpoint(self):
        check_weights(self.raw, self.iteration, self.prepared.run, "iteration")
        return save_checkpoint(self.prepared.run, self.iteration, self.raw, self.optimizer, self.scheduler,
                        {"epoch": self.epoch, "position": self.position, **self.state()},
                        self.config.train.keep_last, engine=self.module if self.deepspeed else None,
                        export=lambda: model_export(self.prepared.model, self.prepared.tokenizer)(self.raw))

    def run(self, step: Callable[[list[str]], Step]) -> list[dict]:
        """Iterate to `train.max_steps`; returns the records of the iterations run here."""
        train, run = self.config.train, self.prepared.run
        history: list[dict] = []
        with stopping.handling_signals():
            try:
                while self.iteration < self.iterations:
                    batches = self.plan(self.epoch)
                    if self.position >= len(batches):
                        self.epoch, self.position = self.epoch + 1, 0
                        continue
                    history.append(self._iterate(step, batches[self.position]))
                    saved = train.save_every and self.iteration % train.save_every == 0
                    if saved:
                        self.checkpoint()
                    stopping.at_boundary(lambda: run.latest_checkpoint() if saved else self.checkpoint(),
                                         self.iteration, self.progress, "iteration")
            except stopping.Interrupted:
                raise
            except KeyboardInterrupt:  # a second signal: stop at once, mid-iteration, saving nothing
                self.progress.close()
                log(f"\nstopped at once during iteration {self.iteration + 1}; nothing was saved after the last "
                    f"checkpoint ({run.latest_checkpoint() or 'none'})")
                raise
        self.progress.close()
        if train.save_every and self.iteration % train.save_every:  # the end, as the supervised loop does
            self.checkpoint()
        return history

    def records(self) -> list[dict]:
        """The iteration records of metrics.jsonl: the whole run, also what was logged before a resume."""
        return [r for r in read_jsonl(self.prepared.run.metrics, warn=False) if "score_mean" in r] \
            if self.prepared.run.metrics.is_file() else []

    def _iterate(self, step: Callable[[list[str]], Step], batch: list[int]) -> dict:
        """One iteration on the prompts of `batch` (this process's share); logs and returns its record."""
        run, data = self.prepared.run, self.prepared.data
        share = len(batch) // self.world  # a short last batch is shared evenly too
        prompts = [data.train[i] for i in batch[self.rank * share:(self.rank + 1) * share]]
        started = time.time()
        done = step(prompts)
        self.iteration, self.position = self.iteration + 1, self.position + 1
        record = {"step": self.iteration, **done.record, "lr": self.scheduler.get_last_lr()[0],
                  "iteration_s": round(time.time() - started, 3)}
        if self.accelerator.is_main_process:
            append_log(run, run.metrics, record)
            if self.sample_every and (self.iteration % self.sample_every == 0 or self.iteration == 1):
                self._log_samples(done.rollout, done.scores)
        self.progress.update(self.iteration, score=record["score_mean"], kl=record.get("kl", 0.0))
        return record

    def finish(self):
        """Write final/ (the policy) and the report; returns final/'s path."""
        final = write_final(self.prepared.run, self.prepared.model, self.prepared.tokenizer, whole=self.raw,
                            config=self.config, data=self.prepared.data)
        if self.accelerator.is_main_process:
            report_at_end(self.prepared.run.path, self.config.train.report)
        return final

    def _log_samples(self, rollout: Rollout, scores: torch.Tensor, n: int = 3) -> None:
        """A few prompt/response/score samples to the log, to samples.jsonl and to the trackers' tables."""
        rows = []
        for prompt, response, score in list(zip(rollout.prompts, rollout.responses, scores.tolist()))[:n]:
            rows.append({"step": self.iteration, "prompt": prompt, "response": response, "score": score})
            append_log(self.prepared.run, self.prepared.run.path / "samples.jsonl", rows[-1], pause_point=None)
            self.progress.write(f"[iteration {self.iteration}] score {score:+.3f} | {prompt[-60:]!r} -> "
                                f"{response[:100]!r}")
        if (opened := trackers.opened(self.prepared.run.path)) is not None:
            opened.log_table("samples", rows, self.iteration)

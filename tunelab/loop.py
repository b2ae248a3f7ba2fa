"""The one training loop every recipe uses.

A recipe hands over a module whose trainable parameters are to be optimized, a `step_fn` that turns
a batch into `(loss_sum, metrics)`, a batch plan per epoch and a collate function. Each collated
batch carries `n_items` (what its loss is averaged over: trained tokens for SFT, pairs for
preference losses) and `n_tokens` (real tokens, for throughput). The loss of an optimizer step is
the sum over its micro-batches divided by their total `n_items`, so gradient accumulation gives the
same gradient as one large batch. A metric is a per-item mean (weighted by `n_items`), or a
`(sum, count)` pair for a mean over some of the items only (KTO's rewards of desirable rows); either
way the logged figure is exact over the whole step.

The loop owns everything else: AdamW, warmup + linear/cosine decay, accumulation, clipping,
precision through `accelerate`, held-out evaluation, metrics.jsonl, progress, checkpoints with
exact resume, Ctrl-C saving, and stopping on a non-finite loss.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from tunelab import distributed, pause, precision, stopping, trackers
from tunelab.checkpoint import RunDir, checkpoint_to_resume, load_checkpoint, save_checkpoint, write_failure
from tunelab.config import TrainConfig
from tunelab.jsonlog import append_jsonl, read_jsonl
from tunelab.report import report_at_end

Batch = dict[str, Any]
Metric = float | tuple[float, float]  # a per-item mean, or (sum, count) over some of the items
StepFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, Metric]]]
PrepareStepFn = Callable[[nn.Module, list[tuple[Batch, float]], torch.device], None]


class TrainingError(RuntimeError):
    """Training cannot go on (for example the loss became NaN); the message says what to try."""


@dataclass
class TrainResult:
    steps: int
    train_loss: float | None
    eval_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    module: nn.Module | None = None  # as prepared (possibly sharded): `write_final` gathers it


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (its stderr is no terminal, yet it draws tqdm.auto's widget)."""
    ipython = sys.modules.get("IPython")  # never imported here: a kernel has always imported it
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


class Progress:
    """A progress bar on a terminal or in a notebook; plain log lines otherwise (or with quiet). Silent on all
    but the main process, so N processes show one bar."""

    def __init__(self, total: int, initial: int, quiet: bool, log_every: int, desc: str):
        self.log_every, self.total = log_every, total
        self.bar = None
        self.silent = not distributed.is_main()
        if not quiet and not self.silent and (sys.stderr.isatty() or in_notebook()):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
        self.start, self.start_step = time.time(), initial

    def update(self, step: int, **shown: float) -> None:
        """Advance to `step`, showing the given values (e.g. loss=..., tok_s=...)."""
        if self.silent:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{v:,.4g}" for k, v in shown.items()}, refresh=False)
        elif step % self.log_every == 0 or step == self.total:
            done = step - self.start_step
            eta = (time.time() - self.start) / max(1, done) * (self.total - step)
            values = " | ".join(f"{k} {v:,.4g}" for k, v in shown.items())
            print(f"step {step}/{self.total} | {values} | eta {int(eta) // 60}:{int(eta) % 60:02d}",
                  file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if self.silent:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def metric_parts(value: Metric, n_items: float) -> tuple[float, float]:
    """(sum, count) of a step function's metric: a per-item mean counts every item of its batch."""
    if isinstance(value, tuple):
        return float(value[0]), float(value[1])
    return value * n_items, n_items


def evaluate(module: nn.Module, batches: list[Batch], step_fn: StepFn, device: torch.device,
             autocast=contextlib.nullcontext) -> dict[str, float]:
    """Mean loss (per item) and the metrics of `step_fn` over `batches`, without gradients.

    With several processes each evaluates its share of the batches once, all in the same number of
    forward passes (a sharded model needs every process in each one; a process short of a batch repeats
    one and discards it), and the sums are combined.
    """
    world, rank = distributed.world_size(), distributed.rank()
    mine = batches[rank::world]
    rounds = math.ceil(len(batches) / world)
    was_training = module.training
    module.eval()
    loss_total, items, sums, counts = 0.0, 0.0, {}, {}
    with torch.no_grad():
        for i in range(rounds):
            batch, weight = (mine[i], 1.0) if i < len(mine) else (batches[0], 0.0)
            with autocast():
                loss_sum, metrics = step_fn(module, to_device(batch, device))
            loss_total += weight * float(loss_sum.detach())
            items += weight * batch["n_items"]
            for key, value in metrics.items():
                metric_sum, metric_count = metric_parts(value, batch["n_items"])
                sums[key] = sums.get(key, 0.0) + weight * metric_sum
                counts[key] = counts.get(key, 0.0) + weight * metric_count
    module.train(was_training)
    loss_total, items, sums, counts = _combine(distributed.gather_objects((loss_total, items, sums, counts)))
    if items == 0:
        return {}
    return {"loss": loss_total / items, **{k: v / counts[k] for k, v in sums.items() if counts[k]}}


def _combine(parts: list[tuple[float, float, dict[str, float], dict[str, float]]]
             ) -> tuple[float, float, dict[str, float], dict[str, float]]:
    """Add up (loss sum, item count, metric sums, metric counts) from every process."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for _, _, part, part_counts in parts:
        for key, value in part.items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0.0) + part_counts[key]
    return sum(p[0] for p in parts), sum(p[1] for p in parts), sums, counts


def _append_metrics(run: RunDir, record: dict) -> None:
    append_log(run, run.metrics, record)


def append_log(run: RunDir, path, record: dict, pause_point: str | None = "metrics") -> None:
    """Append a record to one of the run's JSONL logs; a failed write is a RunDirError saying what is intact.
    A record of metrics.jsonl also goes to the run's experiment trackers (`train.report_to`)."""
    try:
        append_jsonl(path, record, pause_point)
    except OSError as exc:
        raise write_failure(f"a line of {path.name}", run.path, exc, len(json.dumps(record)) + 1,
                            run.latest_checkpoint()) from exc
    if path == run.metrics and (opened := trackers.opened(run.path)) is not None:
        opened.log_record(record)


def last_logged_loss(run: RunDir) -> float | None:
    """The training loss of the last record in metrics.jsonl (a run resumed with no step left to run)."""
    records = [r for r in read_jsonl(run.metrics, warn=False) if "loss" in r and r.get("split") != "eval"] \
        if run.metrics.is_file() else []
    return records[-1]["loss"] if records else None


def nonfinite_name(named_tensors) -> str | None:
    """The name of the first tensor holding NaN or infinity (a shard's local part for sharded ones), or None."""
    for name, tensor in named_tensors:
        local = getattr(tensor, "ds_tensor", None)
        if local is None:
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if local.numel() and not bool(torch.isfinite(local.detach()).all()):
            return name
    return None


def check_weights(module: nn.Module, step: int, run: RunDir, unit: str = "step") -> None:
    """Stop before saving weights that hold NaN or infinity; every process learns of it together."""
    bad = nonfinite_name((n, p) for n, p in module.named_parameters() if p.requires_grad)
    if distributed.all_sum_floats([float(bad is not None)])[0]:
        raise TrainingError(
            f"the weights became NaN or infinite after {unit} {step} ({bad or 'on another process'}); stopped "
            f"before saving them. Last good checkpoint: {run.latest_checkpoint() or 'none'}. Try a lower "
            "learning rate (--lr), gradient clipping (train.max_grad_norm) or fp32 precision.")


def check_grad_norm(norm: float | None, step: int, run: RunDir, unit: str = "step") -> None:
    """Stop before an optimizer step whose gradient is NaN or infinite (the norm is the same on every process)."""
    if norm is not None and not math.isfinite(norm):
        raise TrainingError(
            f"the gradient norm became {norm} at {unit} {step}; stopped before the update. Last good "
            f"checkpoint: {run.latest_checkpoint() or 'none'}. Try a lower learning rate (--lr) or fp32 "
            "precision.")


FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def build_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float, device: torch.device,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW; fused into one kernel on CPU and CUDA (about 5x faster on CPU than the per-tensor loop, no
    temporaries), the same update up to float rounding."""
    if fused is None:
        fused = device.type in ("cpu", "cuda") and all(p.dtype in FUSED_DTYPES for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def _micro_batches(collated: Batch | list[Batch]) -> list[Batch]:
    """A collate function may split a batch into micro-batches (a list); the loop accumulates over them."""
    return collated if isinstance(collated, list) else [collated]


def describe_batch(world: int, batch_size: int, grad_accum: int) -> str:
    """The start-of-run line on batch sizes: per device, accumulation, processes and the effective batch."""
    return (f"batch: {batch_size} examples per device x {grad_accum} accumulation x {world} "
            f"process{'es' if world > 1 else ''} = {batch_size * grad_accum * world} per optimizer step")


def train(*, module: nn.Module, step_fn: StepFn, plan: Callable[[int], list[list[int]]],
          collate: Callable[[list[int]], Batch | list[Batch]], eval_batches: list[Batch], config: TrainConfig, lr: float,
          run: RunDir, resume: bool = False, quiet: bool = False, desc: str = "train",
          prepare_step: PrepareStepFn | None = None, export=None) -> TrainResult:
    """Optimize the trainable parameters of `module`; see the module docstring for the contract.

    `prepare_step(module, [(batch, weight), ...], device)`, when given, runs once per optimizer step before
    its first micro-batch, on every process, with that process's micro-batches (weight 0 marks a repeat
    that only keeps sharded processes in step): it may compute a quantity of the whole step, across
    processes, and store it in the batches (KTO's reference point).

    With N processes each optimizer step takes `grad_accum x N` batches of the plan, each process its
    share; the loss is divided by the item count of all of them (summed over processes), so N processes
    with batch B give the gradient of one process with batch B and `grad_accum` x N. Dropout masks are
    drawn from a seed of (seed, epoch, batch position), so they too do not depend on which process runs
    a batch, nor on a resume.
    """
    from accelerate import Accelerator

    distributed.state()
    # precision is applied here rather than through Accelerator(mixed_precision=...): accelerate's
    # state is a per-process singleton, and one process may run several recipes (the demo, a notebook)
    accelerator = Accelerator()
    device = accelerator.device

    chosen, said = precision.resolve(config.precision, device)
    distributed.log(said)

    def autocast():
        return precision.autocast(chosen, device)

    if not any(p.requires_grad for p in module.parameters()):
        raise TrainingError("the model has no trainable parameters (check the peft settings)")
    optimizer = build_optimizer([p for p in module.parameters() if p.requires_grad], lr, config.weight_decay,
                                device)
    # each optimizer step consumes grad_accum micro-batches per process; a tail too short to give
    # every process a batch ends the epoch (a process without a batch would stall the others)
    world, rank = accelerator.num_processes, accelerator.process_index
    span = config.grad_accum * world
    n_batches = len(plan(0))
    if n_batches < world:
        raise TrainingError(f"{n_batches} batches per epoch cannot feed {world} processes; use more data "
                            "or a smaller batch size")
    steps_per_epoch = n_batches // span + (n_batches % span >= world)
    total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    warmup = math.ceil(config.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total, config.schedule))
    distributed.log(describe_batch(world, config.batch_size, config.grad_accum))

    deepspeed = distributed.uses_deepspeed(accelerator)
    if deepspeed:
        distributed.configure_deepspeed(accelerator, config.batch_size, config.max_grad_norm)
    module, optimizer = accelerator.prepare(module, optimizer)
    raw_module = accelerator.unwrap_model(module)
    step, epoch, position = 0, 0, 0
    if resume:  # into the prepared model and optimizer: a sharding wrapper replaces the parameters
        checkpoint = checkpoint_to_resume(run)
        state = load_checkpoint(checkpoint, raw_module, optimizer, scheduler, engine=module if deepspeed else None)
        step, epoch, position = state["step"], state["epoch"], state["position"]
        if accelerator.is_main_process:
            run.trim_metrics(step)
        distributed.log(f"resumed from {checkpoint} (step {step}/{total})")
    # clipping reads the parameters the prepared model trains (a sharding wrapper replaces them)
    params = [p for p in module.parameters() if p.requires_grad]
    # sharded weights need every process in every forward pass, and DeepSpeed reduces gradients in
    # every backward: then all processes run as many micro-batches per step
    lockstep = deepspeed or distributed.in_lockstep(module)

    def checkpoint_now():
        check_weights(raw_module, step, run)
        return save_checkpoint(run, step, raw_module, optimizer, scheduler, {"epoch": epoch, "position": position},
                               config.keep_last, engine=module if deepspeed else None,
                               export=(lambda: export(module)) if export is not None else None)

    def run_eval() -> dict[str, float]:
        if not eval_batches:
            return {}
        metrics = evaluate(module, eval_batches, step_fn, device, autocast)
        record = {"step": step, "split": "eval", **{f"eval_{k}": v for k, v in metrics.items()}}
        if accelerator.is_main_process:
            _append_metrics(run, record)
        progress.write(f"step {step}: " + ", ".join(f"eval {k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    progress = Progress(total, step, quiet, config.log_every, desc)
    window: dict[str, float] = {}
    window_counts: dict[str, int] = {}  # steps that logged each key (a metric may be missing from some)
    window_tokens, window_start = 0, time.time()
    last_loss, started = (last_logged_loss(run) if resume else None), time.time()
    saved_at = None  # the step of the newest checkpoint written by this loop
    module.train()
    with stopping.handling_signals():
        try:
            while step < total:
                batches = plan(epoch)
                while len(batches) - position >= world and step < total:
                    consumed = batches[position:position + span]
                    group = [(index, piece, batch, 1.0) for index in range(rank, len(consumed), world)
                             for piece, batch in enumerate(_micro_batches(collate(consumed[index])))]
                    if lockstep:  # as many passes as the busiest process: the extra ones repeat a batch, weighted 0
                        busiest = max(distributed.gather_objects(len(group)))
                        group += [(*group[0][:3], 0.0)] * (busiest - len(group))
                    if prepare_step is not None:
                        with autocast():
                            prepare_step(module, [(b, w) for _, _, b, w in group], device)
                    # the loss is a mean over every item of the step, on all processes together
                    n_items = distributed.all_sum_floats([sum(b["n_items"] * w for _, _, b, w in group)])[0] or 1
                    loss_total, n_tokens, sums, counts = 0.0, 0, {}, {}
                    for i, (index, piece, batch, weight) in enumerate(group):
                        torch.manual_seed(distributed.derived_seed(config.seed, epoch, position + index, piece))
                        with distributed.micro_batch(accelerator, module, last=i == len(group) - 1):
                            with autocast():
                                loss_sum, metrics = step_fn(module, to_device(batch, device))
                            # gradients are averaged over processes, so each contributes world x its share
                            accelerator.backward(loss_sum * (weight * world / n_items))
                        pause.at("step")
                        loss_total += weight * float(loss_sum.detach())
                        n_tokens += weight * batch["n_tokens"]
                        for key, metric in metrics.items():  # per-item means, weighted by the micro-batch's items
                            metric_sum, metric_count = metric_parts(metric, batch["n_items"])
                            sums[key] = sums.get(key, 0.0) + weight * metric_sum
                            counts[key] = counts.get(key, 0.0) + weight * metric_count
                    keys = sorted(sums)
                    reduced = distributed.all_sum_floats([loss_total, n_tokens] + [sums[k] for k in keys]
                                                         + [counts[k] for k in keys])
                    if not math.isfinite(reduced[0]):  # seen by every process, so none waits in a collective
                        good = run.latest_checkpoint()
                        raise TrainingError(
                            f"the loss became {reduced[0]} at step {step + 1} (epoch {epoch}); stopped. "
                            f"Last good checkpoint: {good or 'none'}. Try a lower learning rate "
                            "(--lr), gradient clipping (train.max_grad_norm) or fp32 precision.")
                    step_loss = reduced[0] / n_items
                    # (a metric no item of the step had, such as a mean over an empty subset, is left out)
                    sums = {k: v / c for k, v, c in zip(keys, reduced[2:2 + len(keys)], reduced[2 + len(keys):]) if c}
                    grad_norm = None
                    if config.max_grad_norm:  # (DeepSpeed has clipped in its step and reports the norm)
                        norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
                        grad_norm = float(norm) if norm is not None else None
                        check_grad_norm(grad_norm, step + 1, run)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    pause.at("optimizer")
                    step, position = step + 1, position + len(consumed)
                    last_loss = step_loss

                    window_tokens += int(reduced[1])
                    for key, value in {"loss": step_loss, **sums,
                                       **({"grad_norm": grad_norm} if grad_norm is not None else {})}.items():
                        window[key] = window.get(key, 0.0) + value
                        window_counts[key] = window_counts.get(key, 0) + 1
                    elapsed = time.time() - window_start
                    tokens_per_s = window_tokens / max(elapsed, 1e-9)
                    progress.update(step, loss=step_loss, tok_s=tokens_per_s)
                    if step % config.log_every == 0 or step == total:
                        record = {"step": step, "epoch": round(epoch + position / len(batches), 4),
                                  **{k: v / window_counts[k] for k, v in window.items()},
                                  "lr": scheduler.get_last_lr()[0], "tokens_per_s": round(tokens_per_s, 1),
                                  "elapsed_s": round(time.time() - started, 2)}
                        if accelerator.is_main_process:
                            _append_metrics(run, record)
                        window, window_counts, window_tokens, window_start = {}, {}, 0, time.time()
                    if config.eval_every and step % config.eval_every == 0 and step < total:
                        run_eval()
                    if config.save_every and step % config.save_every == 0:
                        checkpoint_now()
                        saved_at = step
                    stopping.at_boundary(lambda: run.latest_checkpoint() if saved_at == step else checkpoint_now(),
                                         step, progress)
                if len(batches) - position < world:
                    epoch, position = epoch + 1, 0
        except stopping.Interrupted:
            raise
        except KeyboardInterrupt:  # a second signal: stop at once, mid-step, saving nothing
            progress.close()
            distributed.log(f"\nstopped at once during step {step + 1}; nothing was saved after the last "
                            f"checkpoint ({run.latest_checkpoint() or 'none'})")
            raise
    progress.close()
    if config.save_every and step % config.save_every:
        checkpoint_now()
    eval_metrics = run_eval()
    if accelerator.is_main_process:
        report_at_end(run.path, config.report)
    return TrainResult(step, last_loss, eval_metrics, time.time() - started, module)


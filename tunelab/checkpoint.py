"""Run directories and checkpoints, written atomically.

runs/<name>/
  config.yaml            the fully resolved config
  metrics.jsonl          one JSON object per logged step
  checkpoints/step-<N>/  trainable weights, optimizer, scheduler, RNG, data position
  final/                 model or adapter + tokenizer, loadable with plain transformers/peft

Everything is written into a hidden temporary directory beside its target and renamed into place,
so a crash mid-save leaves the previous checkpoint (and no half-written one) on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file as _load_tensors
from safetensors.torch import save_file
from torch import nn

CHECKPOINT_PREFIX = "step-"


class RunDirError(RuntimeError):
    """The output directory cannot be used as asked (already holds a run, nothing to resume, ...)."""


def load_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's safetensors file; an empty or truncated one is a RunDirError naming it."""
    from tunelab.modeling import safetensors_problem

    problem = safetensors_problem(Path(path)) if Path(path).is_file() else "it is missing"
    if problem:
        raise RunDirError(f"checkpoint file {path} cannot be read: {problem}")
    return _load_tensors(path)


@contextlib.contextmanager
def atomic_dir(target: Path):
    """Yield a temporary directory that replaces `target` only if the block completes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".old-{target.name}-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file through a temporary name and rename it into place; a failure leaves neither behind and
    raises OutputError naming `path` (a full disk, a read-only folder, ...)."""
    from tunelab.safety import output_error

    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise output_error(path, exc) from exc


def write_output(text: str, output: str | None) -> None:
    """Write `text` whole to the file `output` (atomically, creating folders), or to stdout without one."""
    if output:
        atomic_write_text(Path(output), text)
    else:
        sys.stdout.write(text)


class RunDir:
    """Paths of one run directory and the rules for starting, resuming and overwriting it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.final = self.path / "final"

    def check(self, *, resume: bool = False, overwrite: bool = False) -> None:
        """Raise RunDirError if the directory cannot be used as asked; changes nothing on disk."""
        if not str(self.path) or str(self.path) == ".":
            raise RunDirError("no output directory given: pass --output DIR")
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"output path {self.path} exists and is not a directory")
        occupied = self.path.exists() and any(self.path.iterdir())
        if occupied and not resume and not overwrite:
            raise RunDirError(f"output directory {self.path} already holds files; pass --resume to continue "
                              "that run, --overwrite to replace it, or choose another --output")
        if resume and self.latest_checkpoint() is None:
            raise RunDirError(f"nothing to resume in {self.path}: it has no complete checkpoint "
                              f"(looked in {self.checkpoints})")

    def prepare(self, *, resume: bool = False, overwrite: bool = False) -> None:
        """Check, then create the directory (emptying it first with overwrite) and clear crash leftovers."""
        self.check(resume=resume, overwrite=overwrite)
        if overwrite and not resume and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in [*self.path.glob(".tmp-*"), *self.checkpoints.glob(".tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a crash mid-save

    def checkpoint_dirs(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir()
                 if p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").is_file()]
        return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))

    def latest_checkpoint(self) -> Path | None:
        dirs = self.checkpoint_dirs()
        return dirs[-1] if dirs else None

    def trim_metrics(self, after_step: int) -> None:
        """Drop metric lines logged after `after_step` (by a run that crashed before its next checkpoint)."""
        trim_jsonl(self.metrics, after_step)


def trim_jsonl(path: Path, after_step: int) -> None:
    """Drop the lines of a per-step JSONL log (metrics, samples) whose `step` is after `after_step`."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= after_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    plain = {"python": [version, list(internal), gauss_next], "numpy": [kind, pos, has_gauss, gauss]}
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
    kind, pos, has_gauss, gauss = plain["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = plain["python"]
    random.setstate((version, tuple(internal), gauss_next))


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes, by name, on the CPU."""
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer


ENGINE_DIR = "deepspeed"


def save_checkpoint(run: RunDir, step: int, module: nn.Module, optimizer, scheduler, position: dict,
                    keep_last: int, engine=None) -> Path:
    """Write checkpoint `step-<step>` atomically, then delete all but the newest `keep_last`.

    Called on every process: each one's RNG state is gathered, sharded weights and optimizer state
    (FSDP2) are gathered whole, and the main process writes it all (`rng-<rank>.safetensors`, one per
    process) while the others wait. A DeepSpeed `engine` writes its partitioned optimizer state itself,
    every process its own part, into `deepspeed/` (resuming it needs the same number of processes).
    """
    from tunelab import distributed

    target = run.checkpoints / f"{CHECKPOINT_PREFIX}{step}"
    staging = target.parent / f".tmp-{target.name}-engine"
    if engine is not None:  # a folder every process can name, moved into the checkpoint below
        if distributed.is_main():
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        distributed.wait()
        engine.save_checkpoint(str(staging), tag=ENGINE_DIR)
        distributed.wait()
    rng_states = distributed.gather_objects(_rng_state())
    sharded = bool(distributed.fsdp_units(module))
    if sharded:  # every process joins in gathering whole tensors; the main process receives them
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        whole = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        weights = get_model_state_dict(module, options=whole)
        optimizer_state = get_optimizer_state_dict(module, _torch_optimizer(optimizer), options=whole)
    else:
        with distributed.gathered(module):
            weights = trainable_state(module) if distributed.is_main() else None
    if distributed.is_main():
        with atomic_dir(target) as tmp:
            save_file(weights, tmp / "trainable.safetensors")
            if engine is not None:
                os.replace(staging / ENGINE_DIR, tmp / ENGINE_DIR)
                shutil.rmtree(staging, ignore_errors=True)
            else:
                torch.save(optimizer_state if sharded else optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            for rank, (tensors, _) in enumerate(rng_states):
                save_file(tensors, tmp / f"rng-{rank}.safetensors")
            state = {"step": step, **position, "world_size": len(rng_states), "rng": [p for _, p in rng_states]}
            (tmp / "state.json").write_text(json.dumps(state))  # written last: its presence marks completeness
        for old in run.checkpoint_dirs()[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.wait()
    return target


def load_checkpoint(path: Path, module: nn.Module, optimizer, scheduler, engine=None) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG from a checkpoint into a prepared
    module and optimizer (or DeepSpeed `engine`); return the checkpoint's state (step, position, ...).
    Every process reads the same files (a shared file system across nodes)."""
    from tunelab import distributed

    state = json.loads((path / "state.json").read_text())
    weights = load_file(path / "trainable.safetensors")
    params = dict(module.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    if missing or unknown:
        raise RunDirError(f"checkpoint {path} does not match this model: missing {missing[:3]}, "
                          f"unexpected {unknown[:3]} (was the config changed since it was written?)")
    if engine is not None:
        if not (path / ENGINE_DIR).is_dir():
            raise RunDirError(f"checkpoint {path} was not written under DeepSpeed; resume it with the engine "
                              "that wrote it")
        saved = state["world_size"]
        if saved != distributed.world_size():
            raise RunDirError(f"checkpoint {path} holds DeepSpeed optimizer state partitioned over {saved} "
                              f"processes; resume it with {saved} processes, not {distributed.world_size()}")
        engine.load_checkpoint(str(path), tag=ENGINE_DIR)  # weights and partitioned optimizer state
    elif distributed.fsdp_units(module):
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)  # whole tensors in the files, each process keeps its shard
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(module, _torch_optimizer(optimizer), optimizer_state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_plain, saved_world, rank = state.pop("rng"), state.pop("world_size"), distributed.rank()
    if saved_world != distributed.world_size():
        distributed.log(f"note: {path} was written by {saved_world} process(es) and is resumed with "
                        f"{distributed.world_size()}: weights, optimizer and data position continue, and the "
                        "batches of each step are shared out anew; the random state starts afresh where no "
                        "process of that rank was saved")
    if rank < saved_world:
        _set_rng_state(load_file(path / f"rng-{rank}.safetensors"), rng_plain[rank])
    return state

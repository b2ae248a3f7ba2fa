"""Run directories and checkpoints, written atomically.

runs/<name>/
  config.yaml            the fully resolved config
  metrics.jsonl          one JSON object per logged step
  checkpoints/step-<N>/  trainable weights, optimizer, scheduler, RNG, data position; model/: the model as
                         final/ holds it, loadable with plain transformers/peft
  final/                 model or adapter + tokenizer, loadable with plain transformers/peft

Everything is written into a hidden temporary directory beside its target and renamed into place,
so a crash mid-save leaves the previous checkpoint (and no half-written one) on disk. A checkpoint and
final/ carry `manifest.json` (every file's size and sha256), written last and flushed to disk before the
rename: resume verifies it, and skips a damaged checkpoint for the one before.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file as _load_tensors
from safetensors.torch import save_file
from torch import nn

from tunelab import pause, runlock
from tunelab.jsonlog import trim_jsonl
from tunelab.naming import setting

CHECKPOINT_PREFIX = "step-"
MANIFEST = "manifest.json"


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
def atomic_dir(target: Path, manifest: bool = False):
    """Yield a temporary directory that replaces `target` only if the block completes.

    With `manifest`, `manifest.json` (sizes and checksums of every file) is written last and everything
    is flushed to disk before the rename, so `target` is complete whenever it exists, even after a power cut.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if manifest:
            write_manifest(tmp)
            pause.at("checkpoint-done")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".old-{target.name}-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_digest(path: Path, flush: bool = False) -> dict:
    """Size and sha256 of a file (flushed to disk first with `flush`)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if flush:
            os.fsync(handle.fileno())
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """Write `folder/manifest.json`: the size and sha256 of every file in it (hashed in parallel), last."""
    names = _files(folder)
    with ThreadPoolExecutor(max_workers=min(8, len(names) or 1)) as pool:
        digests = dict(zip(names, pool.map(lambda n: _file_digest(folder / n, flush=True), names)))
    for sub in {(folder / n).parent for n in names}:
        _fsync_dir(sub)
    with (folder / MANIFEST).open("w") as handle:
        json.dump({"files": digests}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(folder)


def verify_manifest(folder: Path) -> str | None:
    """What is wrong with a folder written with a manifest (missing, truncated or changed files), or None."""
    try:
        listed = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is missing or unreadable"
    for name, expected in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} is {size} bytes, {expected['bytes']} were written (truncated or overwritten)"
    for name, expected in listed.items():
        if _file_digest(folder / name)["sha256"] != expected["sha256"]:
            return f"{name} does not match its checksum (the file was damaged after it was written)"
    return None


def state_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) state dict: about what saving it takes on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def write_failure(what: str, folder: Path, exc: OSError, needed: int, good: Path | None) -> RunDirError:
    """The error for an OSError while writing `what` into `folder`: what it needed, what is intact."""
    kept = f"the last good checkpoint {good} is intact" if good else "no earlier checkpoint exists"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
        return RunDirError(f"no space left on the device while writing {what}: it needs about {_size(needed)}"
                           f" and {_size(free)} is free in {folder}; nothing of it was kept, {kept}. Free "
                           f"some space, then run it again with {setting('resume', True)}")
    return RunDirError(f"could not write {what} into {folder}: {exc.strerror or exc}; nothing of it was kept, "
                       f"{kept}")


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
            raise RunDirError(f"no output directory given: set {setting('output', metavar='DIR')}")
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"output path {self.path} exists and is not a directory")
        occupied = self.path.exists() and any(self.path.iterdir())
        if occupied and not resume and not overwrite:
            raise RunDirError(f"output directory {self.path} already holds files; pass {setting('resume', True)} to "
                              f"continue that run, {setting('overwrite', True)} to replace it, or choose another "
                              f"{setting('output')}")
        if resume and self.latest_checkpoint() is None:
            raise RunDirError(f"nothing to resume in {self.path}: it has no complete checkpoint "
                              f"(looked in {self.checkpoints})")
        if self.path.is_dir():
            try:
                runlock.check_free(self.path)
            except runlock.LockedError as exc:
                raise RunDirError(str(exc)) from None

    def prepare(self, *, resume: bool = False, overwrite: bool = False) -> None:
        """Check, then create the directory (emptying it first with overwrite) and clear crash leftovers."""
        self.check(resume=resume, overwrite=overwrite)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            runlock.acquire(self.path)
        except runlock.LockedError as exc:
            raise RunDirError(str(exc)) from None
        except OSError as exc:
            raise RunDirError(f"cannot write into the output directory {self.path}: {exc.strerror or exc}") from None
        if overwrite and not resume:  # everything but the lock just taken
            for entry in self.path.iterdir():
                if entry.name != runlock.LOCK_NAME:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        for stale in [*self.path.glob(".tmp-*"), *self.checkpoints.glob(".tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a crash mid-save

    def checkpoint_dirs(self) -> list[Path]:
        """Complete checkpoints (renamed into place: with a manifest, or from before manifests), oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir()
                 if p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()
                 and ((p / MANIFEST).is_file() or (p / "state.json").is_file())]
        return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))

    def latest_checkpoint(self) -> Path | None:
        dirs = self.checkpoint_dirs()
        return dirs[-1] if dirs else None

    def resume_checkpoint(self, say=print) -> Path:
        """The newest checkpoint whose files match its manifest; damaged newer ones are reported (via `say`)
        and set aside as `damaged-step-<N>`. Raises RunDirError when none is good."""
        problems = []
        for path in reversed(self.checkpoint_dirs()):
            if not (path / MANIFEST).is_file():  # renamed into place complete, by a tunelab without manifests
                say(f"note: {path} has no {MANIFEST} (written by an earlier tunelab): resuming without checking it")
                return path
            problem = verify_manifest(path)
            if problem is None:
                if problems:
                    say(f"resuming from {path}, the newest checkpoint that is intact")
                return path
            aside = path.with_name(f"damaged-{path.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
            problems.append(f"{path.name}: {problem}")
            say(f"warning: checkpoint {path} is damaged ({problem}); set aside as {aside}")
        raise RunDirError(f"nothing to resume in {self.path}: no intact checkpoint ("
                          + "; ".join(problems or ["none found"]) + ")")

    def trim_metrics(self, after_step: int) -> None:
        """Drop metric lines logged after `after_step` (by a run that crashed before its next checkpoint)."""
        trim_jsonl(self.metrics, after_step)


def checkpoint_to_resume(run: RunDir) -> Path:
    """The checkpoint every process resumes from: the main process verifies them (`resume_checkpoint`)."""
    from tunelab import distributed

    chosen: Path | str = ""
    if distributed.is_main():
        try:
            chosen = run.resume_checkpoint(say=distributed.log)
        except RunDirError as exc:
            chosen = str(exc)
    chosen = distributed.gather_objects(chosen)[0]
    if isinstance(chosen, str):
        raise RunDirError(chosen)
    return chosen


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


MODEL_DIR = "model"


def save_checkpoint(run: RunDir, step: int, module: nn.Module, optimizer, scheduler, position: dict,
                    keep_last: int, engine=None, export=None) -> Path:
    """Write checkpoint `step-<step>` atomically, then delete all but the newest `keep_last`.

    `export`, when given, is called on every process (it may gather sharded weights) and returns a function
    that writes the model as `save_pretrained` does into a folder: the checkpoint's `model/`, loadable with
    plain transformers / peft like final/. Resuming reads only the files beside it.

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
    write_model = export() if export is not None else None

    def write() -> None:
        saved_optimizer = None if engine is not None else optimizer_state if sharded else optimizer.state_dict()
        good = run.latest_checkpoint()
        try:
            with atomic_dir(target, manifest=True) as tmp:
                save_file(weights, tmp / "trainable.safetensors")
                pause.at("checkpoint")
                if engine is not None:
                    os.replace(staging / ENGINE_DIR, tmp / ENGINE_DIR)
                    shutil.rmtree(staging, ignore_errors=True)
                else:
                    torch.save(saved_optimizer, tmp / "optimizer.pt")
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                for rank, (tensors, _) in enumerate(rng_states):
                    save_file(tensors, tmp / f"rng-{rank}.safetensors")
                state = {"step": step, **position, "world_size": len(rng_states),
                         "rng": [p for _, p in rng_states]}
                (tmp / "state.json").write_text(json.dumps(state))
                if write_model is not None:
                    write_model(tmp / MODEL_DIR)
        except OSError as exc:
            needed = state_bytes(weights) + state_bytes(saved_optimizer) + state_bytes(rng_states)
            raise write_failure(f"checkpoint {target.name}", run.checkpoints, exc, needed, good) from exc
        for old in run.checkpoint_dirs()[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    main_writes(write)
    return target


def main_writes(write) -> None:
    """Run `write()` on the main process while the others wait; a RunDirError it raises is raised on every
    process, so none is left waiting for the others."""
    from tunelab import distributed

    if distributed.world_size() == 1:
        write()
        return
    error = None
    if distributed.is_main():
        try:
            write()
        except RunDirError as exc:
            error = str(exc)
    error = distributed.gather_objects(error)[0]
    if error:
        raise RunDirError(error)


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

"""One accelerate state per process, and the few cross-process reductions the recipes need.

tunelab never builds process groups itself: `torchrun` or `accelerate launch` start the processes and
set the environment, and accelerate forms the group. What is done here is to build that state once,
first, with the right device (gloo on CPU-only machines, where accelerate would otherwise fall back
to N independent single-process runs), and to refuse a launch that did not form a group.

Every quantity that normalises a loss or decides something (item counts, non-finite checks, reward and
advantage statistics, early stops) goes through `all_sum`, so N processes compute what one process
computes on the whole batch.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import signal
import sys
from typing import Any

import torch


class LaunchError(RuntimeError):
    """The processes were started but do not form one group; the message says how to launch."""


def launched_world_size() -> int:
    """How many processes the launcher says it started (1 when not launched by torchrun / accelerate)."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def _wants_cpu(world: int) -> bool:
    """Use the CPU (gloo) for a multi-process launch on a machine without an accelerator, or when asked."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    return world > 1 and not torch.accelerator.is_available()


def _stop_with_launcher() -> None:
    """Ask the kernel to end this worker when its launcher dies (torchrun starts workers in their own session,
    so a killed launcher would otherwise leave them training and writing)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def state():
    """The process's accelerate `PartialState`, built on first use, before anything asks for a device."""
    from accelerate import PartialState

    if PartialState._shared_state:
        return PartialState()
    world = launched_world_size()
    current = PartialState(cpu=_wants_cpu(world))
    if world > 1 and current.num_processes == 1:
        raise LaunchError(
            f"the launcher started {world} processes but they did not form one group (accelerate chose "
            f"{current.distributed_type}); each would train alone. Launch with `torchrun --nproc_per_node N -m "
            "tunelab ...` or `accelerate launch --config_file examples/accelerate/ddp.yaml -m tunelab ...`")
    if current.num_processes > 1:
        _stop_with_launcher()
    return current


def is_main() -> bool:
    return state().is_main_process


def rank() -> int:
    return state().process_index


def world_size() -> int:
    return state().num_processes


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of a tensor over all processes (the tensor itself on one process)."""
    if world_size() == 1:
        return values
    from accelerate.utils import reduce

    return reduce(values.to(state().device), reduction="sum").to(values.device)


def all_sum_floats(values: list[float]) -> list[float]:
    """`all_sum` for a list of Python numbers (float64, so counts stay exact)."""
    if world_size() == 1:
        return list(values)
    return all_sum(torch.tensor(values, dtype=torch.float64)).tolist()


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor's first dimension over processes, in rank order (sizes may differ)."""
    if world_size() == 1:
        return tensor
    from accelerate.utils import gather, pad_across_processes

    device = state().device
    sizes = gather(torch.tensor([tensor.shape[0]], device=device)).tolist()
    padded = gather(pad_across_processes(tensor.to(device), dim=0))
    width = max(sizes)
    return torch.cat([padded[r * width:r * width + n] for r, n in enumerate(sizes)]).to(tensor.device)


def gather_objects(obj: Any) -> list[Any]:
    """One picklable object from every process, in rank order."""
    if world_size() == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def wait() -> None:
    state().wait_for_everyone()


def finish(destroy: bool = True) -> None:
    """End a command that succeeded on several processes: every process waits for the others, then the
    process group is taken down (`destroy`), so no process exits while a peer still holds a connection to it
    (a gloo worker torn down that way can abort its process at exit). The `tunelab` command passes
    `destroy=False` and leaves through `os._exit` right after the barrier, so that no destructor of the
    communication library runs at all."""
    import torch.distributed as dist

    global _GROUP_ENDED
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        if destroy:
            dist.destroy_process_group()
        _GROUP_ENDED = True


_GROUP_ENDED = False


def group_ended() -> bool:
    """Whether `finish` took a process group down in this process."""
    return _GROUP_ENDED


def derived_seed(*parts: object) -> int:
    """A seed that depends only on `parts` (e.g. seed, epoch, batch position), not on the process or history."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure_deepspeed(accelerator, batch_size: int, max_grad_norm: float | None) -> None:
    """Fill a DeepSpeed config for tunelab's loop before `prepare`: tunelab feeds its own micro-batches
    (no dataloader), accumulates and normalises itself (DeepSpeed's accumulation stays 1, so it does not
    rescale the loss) and clips at `train.max_grad_norm` (which DeepSpeed applies in its step). An
    optimizer or scheduler section would replace tunelab's own: dropped."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = batch_size
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = batch_size * accelerator.num_processes
    config["gradient_clipping"] = max_grad_norm or 0.0
    for section in ("optimizer", "scheduler"):
        config.pop(section, None)


@contextlib.contextmanager
def micro_batch(accelerator, module, last: bool):
    """One micro-batch's backward inside an optimizer step: only the last one synchronises gradients
    (DDP, FSDP) or, under DeepSpeed, reduces them and steps the engine."""
    if uses_deepspeed(accelerator):
        accelerator.gradient_state._set_sync_gradients(last)
        try:
            yield
        finally:
            accelerator.gradient_state._set_sync_gradients(True)
    elif last:
        yield
    else:
        with accelerator.no_sync(module):
            yield


def fsdp_units(module) -> list:
    """The FSDP2-sharded submodules of `module` (none unless accelerate prepared it with FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def zero3_parameters(module) -> list:
    """Parameters that DeepSpeed ZeRO-3 has partitioned across processes (none otherwise)."""
    return [p for p in module.parameters() if hasattr(p, "ds_id")]


def in_lockstep(module) -> bool:
    """True when `module`'s parameters are sharded (FSDP2, ZeRO-3): every forward pass is then a collective,
    so all processes must run the same number of them."""
    from torch.distributed.fsdp import FSDPModule

    first = next(module.parameters(), None)
    if first is not None and hasattr(first, "ds_id"):
        return True
    return any(isinstance(m, FSDPModule) for m in module.modules())


@contextlib.contextmanager
def gathered(module, generation: bool = False):
    """Whole parameters on every process for the block: for generation, a reference pass or saving, where
    a sharded model (FSDP2, ZeRO-3) would otherwise need every process in every forward. Nothing to do
    for DDP or one process. Every process must enter it (gathering is a collective).

    For `generation` under ZeRO-3 the parameters stay partitioned: DeepSpeed's own hooks fetch them
    layer by layer, and transformers' `generate` keeps the processes in step (synced_gpus) until all end.
    """
    units = fsdp_units(module)
    partitioned = zero3_parameters(module) if not units else []
    if partitioned and generation:
        yield module
        return
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned):
            yield module
        return
    if units and units[0] is module:
        # FSDP2 sets itself up on the root's first forward; a call into an inner module before that
        # (generation before any training pass) would make the inner unit a root of its own
        module._get_fsdp_state()._lazy_init()
    # each unit's own setting, to put back after (FSDP2 keeps the root unsharded between forward and backward)
    resharding = [_reshards_after_forward(unit) for unit in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield module
    finally:
        for unit, reshard in zip(units, resharding):
            unit.reshard()
            unit.set_reshard_after_forward(reshard, recurse=False)


def _reshards_after_forward(unit) -> bool:
    group = unit._get_fsdp_state()._fsdp_param_group
    return group is not None and group.post_forward_mesh_info is not None


def whole_state_dict(root, inner) -> dict | None:
    """`inner`'s state dict with whole tensors, where `root` (the prepared module holding it) is sharded.

    Every process must call it; the main process gets the dict, the others an empty one. None when
    nothing is sharded (the model's own state dict is whole).
    """
    if fsdp_units(root):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        prefix = next(name for name, m in root.named_modules() if m is inner)
        state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        cut = len(prefix) + 1 if prefix else 0
        return {k[cut:]: v for k, v in state.items() if not prefix or k.startswith(prefix + ".")}
    if zero3_parameters(root):
        with gathered(root):
            return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()} if is_main() else {}
    return None


def log(text: str) -> None:
    """Status lines go to stderr (stdout stays clean for results), from the main process only; control
    characters that came with data (file names, samples) are shown escaped, never sent to the terminal."""
    from tunelab.safety import terminal_safe

    if is_main():
        print(terminal_safe(text), file=sys.stderr, flush=True)

"""Runs the `tunelab` command under a launcher and records what each process saw, for the multi-process tests.

    torchrun --nproc_per_node 2 tests/mp_worker.py RECORD_DIR sft --model ... --output ...

Each process appends JSON lines to RECORD_DIR/rank-<r>.jsonl: its pid, the row indices of every batch the
training loop collated, for PPO the inputs and outputs of advantage whitening and of the logged
statistics, for PPO and GRPO the number of micro-batches of each pass, and for KTO each reference point z0 with the
log-ratios it was computed from. TUNELAB_TEST_STEP_SLEEP (seconds) slows every training step, so a test can kill a run
after a checkpoint; TUNELAB_TEST_NAN_AT=RANK:CALL makes one step-function call of one process give NaN.
TUNELAB_TEST_ENGINE=fsdp2 gives the run the accelerate state an FSDP2 launch builds
on GPUs, on the CPU processes' gloo group (accelerate's launcher refuses FSDP without a GPU);
TUNELAB_TEST_ENGINE=zero2 or zero3 does the same for DeepSpeed ZeRO (on DeepSpeed's CPU accelerator).
TUNELAB_TEST_FIXED_ROLLOUTS=1 replaces sampling in the online recipes with responses that depend only on
the prompt, the sample's number within its group and the iteration, so one process and several see the
same responses and must make the same updates.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

RECORD_DIR = Path(sys.argv[1])


def record(kind: str, **values) -> None:
    from tunelab import distributed

    with (RECORD_DIR / f"rank-{distributed.rank()}.jsonl").open("a") as handle:
        handle.write(json.dumps({"kind": kind, **values}) + "\n")


def tensor(value):
    return value.detach().cpu().tolist()


def install_recorders() -> None:
    from tunelab import distributed, loop
    from tunelab.distributed import fsdp_units
    from tunelab.recipes import online, ppo

    train = loop.train
    sleep = float(os.environ.get("TUNELAB_TEST_STEP_SLEEP", "0"))
    poison = os.environ.get("TUNELAB_TEST_NAN_AT", "")  # RANK:CALL, the step-function call that gives NaN

    def recording_train(**kwargs):
        collate, step_fn = kwargs["collate"], kwargs["step_fn"]

        def recording_collate(indices):
            record("batch", rows=list(indices))
            return collate(indices)

        calls = {"n": 0}

        def test_step(module, batch):
            time.sleep(sleep)
            loss_sum, metrics = step_fn(module, batch)
            calls["n"] += 1
            if f"{distributed.rank()}:{calls['n']}" == poison:  # a NaN on this process only
                loss_sum = loss_sum * float("nan")
            return loss_sum, metrics
        result = train(**{**kwargs, "collate": recording_collate, "step_fn": test_step})
        record("prepared", module=type(result.module).__name__, units=len(fsdp_units(result.module)))
        return result
    loop.train = recording_train

    whiten = ppo.masked_whiten

    def recording_whiten(values, mask, *args, **kwargs):
        result = whiten(values, mask, *args, **kwargs)
        record("whiten", values=tensor(values), mask=tensor(mask), result=tensor(result))
        return result
    ppo.masked_whiten = recording_whiten

    statistics = ppo.rollout_statistics
    write_final = online.write_final

    def recording_write_final(run, model, tokenizer, whole=None, **card):
        record("prepared", module=type(whole).__name__, units=len(fsdp_units(whole)))
        return write_final(run, model, tokenizer, whole=whole, **card)
    online.write_final = recording_write_final

    def recording_statistics(raw_scores, rollout, experience):
        result = statistics(raw_scores, rollout, experience)
        record("rollout", prompts=rollout.prompts, scores=tensor(raw_scores), kl=tensor(experience["kl"]),
               mask=tensor(experience["mask"]), values=tensor(experience["values"]),
               returns=tensor(experience["returns"]), ended=tensor(rollout.ended.float()), statistics=result)
        return result
    ppo.rollout_statistics = recording_statistics

    from tunelab.recipes import grpo

    for recipe in (grpo, ppo):
        def recording_pieces(attention_mask, rows, budget, pieces_of=recipe.row_pieces):
            pieces = pieces_of(attention_mask, rows, budget)  # the micro-batches of a pass on this process
            record("pieces", rows=len(rows), count=len(pieces))
            return pieces
        recipe.row_pieces = recording_pieces

    from tunelab.recipes import kto

    reference_point = kto.kto_reference_point

    def recording_reference_point(logratios, all_sum=None):  # KTO's z0: this process's rows and the result
        result = reference_point(logratios, all_sum=all_sum)
        record("kto_z0", logratios=tensor(logratios), z0=float(result), over_processes=all_sum is not None)
        return result
    kto.kto_reference_point = recording_reference_point


def fixed_rollouts() -> None:
    import zlib

    import torch

    from tunelab.recipes import online
    from tunelab.rollout import left_padded, rollout_from

    def sample(self, prompts, repeats=1):
        tokenizer = self.prepared.tokenizer
        rows = [p for p in prompts for _ in range(repeats)]
        responses = []
        for k, prompt in enumerate(rows):
            rng = torch.Generator().manual_seed(zlib.crc32(f"{prompt}|{k % repeats}|{self.iteration}".encode()))
            length = int(torch.randint(2, 7, (1,), generator=rng))
            ids = torch.randint(4, len(tokenizer), (length,), generator=rng).tolist()
            responses.append(ids + [tokenizer.eos_token_id] * (7 - length))  # a short one ends with EOS
        return rollout_from(left_padded(tokenizer, rows, self.device), torch.tensor(responses, device=self.device),
                            tokenizer, rows)
    online.OnlineLoop.sample = sample


def force_fsdp2() -> None:
    """Make every `Accelerator()` tunelab builds an FSDP2 one (what `--config_file fsdp2.yaml` gives on GPUs)."""
    import accelerate
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    class FSDP2Accelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            plugin = FullyShardedDataParallelPlugin(
                # the block class to wrap comes from the model, as with examples/accelerate/fsdp2.yaml
                fsdp_version=2, auto_wrap_policy="TRANSFORMER_BASED_WRAP", reshard_after_forward=True,
                state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False)
            super().__init__(*args, fsdp_plugin=plugin, **kwargs)
            # accelerate turns FSDP on only for GPU-like process groups
            self.state.distributed_type = DistributedType.FSDP
            self.state.fsdp_plugin = plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerate.Accelerator = FSDP2Accelerator


def start_deepspeed(stage: int) -> None:
    """The state `accelerate launch --config_file zero<stage>.yaml` builds, on a gloo group."""
    from accelerate.state import PartialState

    os.environ.update({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage),
                       "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true" if stage == 3 else "false",
                       "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true" if stage == 3 else "false",
                       "ACCELERATE_TORCH_DEVICE": "cpu"})
    PartialState(backend="gloo")


if __name__ == "__main__":
    from tunelab import distributed
    from tunelab.cli import main

    RECORD_DIR.mkdir(parents=True, exist_ok=True)
    engine = os.environ.get("TUNELAB_TEST_ENGINE", "")
    if engine.startswith("zero"):
        start_deepspeed(int(engine[-1]))
    distributed.state()
    record("start", pid=os.getpid(), world=distributed.world_size())
    install_recorders()
    if os.environ.get("TUNELAB_TEST_FIXED_ROLLOUTS"):
        fixed_rollouts()
    if engine == "fsdp2":
        force_fsdp2()
    sys.exit(main(sys.argv[2:]))

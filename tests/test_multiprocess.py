"""Two real processes (torchrun, gloo on the CPU) against one process doing the same work.

N processes with batch B must give what one process gives with batch B and `grad_accum=N`: the same final
weights, the same logged losses, each held-out row evaluated once. Every run here is tiny: a 2-layer,
32-wide model, a few steps, one thread per process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import instruction_rows, make_tiny_model_dir, max_weight_diff, write_jsonl
from tests.recipes.test_reward import review_pairs

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "mp_worker.py"


def launch_command(nproc: int, record: Path, args: list[str]) -> list[str]:
    # --standalone: torchrun binds its rendezvous store to a port of its own choosing, so two launches never race
    # for one port
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(WORKER), str(record), *args]


def launch_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
            **extra}


def launch(nproc: int, record: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """Run `tunelab ARGS` on `nproc` processes; fails the test with the output if it does not exit 0."""
    done = subprocess.run(launch_command(nproc, record, args), env=launch_env(**env), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def records(record: Path, rank: int, kind: str) -> list[dict]:
    lines = (record / f"rank-{rank}.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_curves(one: Path, two: Path) -> None:
    """Every logged loss and metric of the 2-process run equals the 1-process run's (throughput aside)."""
    first, second = metrics(one), metrics(two)
    assert [m["step"] for m in first] == [m["step"] for m in second]
    for a, b in zip(first, second):
        for key in a.keys() - {"tokens_per_s", "elapsed_s", "epoch", "split"}:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    model = make_tiny_model_dir(root / "model")
    return {"root": root, "model": model,
            "sft": write_jsonl(root / "sft.jsonl", instruction_rows(48)),
            "pairs": write_jsonl(root / "pairs.jsonl", review_pairs(40)),
            "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": f"Write a review of Film {i}.\n"}
                                                            for i in range(32)]),
            # every other prompt longer: the processes' rows then split into different numbers of micro-batches
            "uneven_prompts": write_jsonl(root / "uneven.jsonl", [
                {"prompt": f"Write a review of Film {i}." + " Be brief." * (3 * (i % 2)) + "\n"} for i in range(32)])}


def common_args(world, recipe: str, data: str, **extra) -> list[str]:
    return [recipe, "--model", str(world["model"]), "--data", str(world[data]), "--batch-size", "4", "--quiet",
            "train.log_every=1", "train.report=false", "train.eval_every=2", *[f"{k}={v}" for k, v in extra.items()]]


def test_sft_two_processes_equal_one_with_accumulation(world, tmp_path):
    """LoRA with dropout on (its default 0.05): the masks follow the batch, not the process."""
    args = common_args(world, "sft", "sft") + ["--max-steps", "5", "--lr", "1e-2"]
    one = launch(1, tmp_path / "rec1", args + ["--output", str(tmp_path / "one"), "train.grad_accum=2"])
    two = launch(2, tmp_path / "rec2", args + ["--output", str(tmp_path / "two")])
    assert max_weight_diff(tmp_path / "one", tmp_path / "two") <= 1e-6
    assert_same_curves(tmp_path / "one", tmp_path / "two")
    assert len(metrics(tmp_path / "two")) == 5 + 3  # 5 steps, evals at steps 2, 4 and the end, each logged once
    # one group of two, printing once; ranks take disjoint batches whose union is the 1-process run's
    assert "processes: 2 (MULTI_CPU, gloo" in two.stderr and two.stderr.count("sft done") == 1
    assert two.stdout.strip() == str(tmp_path / "two" / "final")
    assert "4 examples per device x 1 accumulation x 2 processes = 8 per optimizer step" in two.stderr
    assert "x 2 accumulation x 1 process = 8" in one.stderr
    rank0, rank1 = ([b["rows"] for b in records(tmp_path / "rec2", r, "batch")] for r in (0, 1))
    assert {i for b in rank0 for i in b}.isdisjoint({i for b in rank1 for i in b})
    single = [b["rows"] for b in records(tmp_path / "rec1", 0, "batch")]
    assert sorted(rank0 + rank1) == sorted(single) and len(single) == 10


def test_reward_model_two_processes_equal_one(world, tmp_path):
    args = common_args(world, "rm", "pairs") + ["--max-steps", "4", "--peft", "none", "--lr", "1e-3"]
    launch(1, tmp_path / "rec1", args + ["--output", str(tmp_path / "one"), "train.grad_accum=2"])
    launch(2, tmp_path / "rec2", args + ["--output", str(tmp_path / "two")])
    assert max_weight_diff(tmp_path / "one", tmp_path / "two") <= 1e-6
    assert_same_curves(tmp_path / "one", tmp_path / "two")


def test_dpo_two_processes_equal_one_with_a_shared_out_reference_pass(world, tmp_path):
    """Full fine-tuning: each process computes half of the reference log-probs before training."""
    args = common_args(world, "dpo", "pairs") + ["--max-steps", "4", "--peft", "none", "--lr", "1e-3"]
    launch(1, tmp_path / "rec1", args + ["--output", str(tmp_path / "one"), "train.grad_accum=2"])
    two = launch(2, tmp_path / "rec2", args + ["--output", str(tmp_path / "two")])
    assert "precomputed from the starting weights" in two.stderr
    assert max_weight_diff(tmp_path / "one", tmp_path / "two") <= 1e-6
    assert_same_curves(tmp_path / "one", tmp_path / "two")


def test_kto_two_processes_equal_one_with_the_reference_point_over_both(world, tmp_path):
    """Full fine-tuning (a frozen reference copy on each process): each step's z0 is the mean log-ratio of the
    mismatched rows of both processes, what one process gets from its two accumulated micro-batches."""
    args = common_args(world, "kto", "pairs") + ["--max-steps", "4", "--peft", "none", "--lr", "3e-3",
                                                 "kto.beta=0.5"]
    launch(1, tmp_path / "rec1", args + ["--output", str(tmp_path / "one"), "train.grad_accum=2"])
    two = launch(2, tmp_path / "rec2", args + ["--output", str(tmp_path / "two")])
    assert "reference: frozen copy" in two.stderr
    assert max_weight_diff(tmp_path / "one", tmp_path / "two") <= 1e-6
    assert_same_curves(tmp_path / "one", tmp_path / "two")  # loss, kl (z0), rewards, held-out figures

    def training_points(record: Path, rank: int) -> list[dict]:  # (held-out batches take z0 from their own rows)
        return [r for r in records(record, rank, "kto_z0") if r["over_processes"]]
    single, first, second = training_points(tmp_path / "rec1", 0), *(training_points(tmp_path / "rec2", r)
                                                                     for r in (0, 1))
    assert len(single) == len(first) == len(second) == 4
    alone_differs = False
    for one_step, a, b in zip(single, first, second):
        assert a["z0"] == b["z0"] == pytest.approx(one_step["z0"], abs=1e-6)
        both = a["logratios"] + b["logratios"]  # rank 0 ran the step's first batch, rank 1 its second
        assert both == pytest.approx(one_step["logratios"], abs=1e-5)
        assert a["z0"] == pytest.approx(max(0.0, sum(both) / len(both)), abs=1e-6)
        alone_differs |= abs(max(0.0, sum(a["logratios"]) / len(a["logratios"])) - a["z0"]) > 1e-3
    assert any(r["z0"] > 0 for r in single) and any(r["z0"] == 0 for r in single)  # both sides of the clamp
    assert alone_differs  # a process's own rows alone would have given another z0
    assert [m["kl"] for m in metrics(tmp_path / "two") if "kl" in m] == pytest.approx([r["z0"] for r in single])


def test_resume_after_killing_the_launcher_matches_an_uninterrupted_run(world, tmp_path):
    """Kill the launcher after a checkpoint: its workers stop too; resuming on 2 processes ends with the
    weights of a run never interrupted (LoRA dropout on)."""
    args = common_args(world, "sft", "sft") + ["--max-steps", "6", "--lr", "1e-2", "train.save_every=2",
                                               "train.keep_last=5"]
    launch(2, tmp_path / "rec-ref", args + ["--output", str(tmp_path / "ref")])

    cut, record = tmp_path / "cut", tmp_path / "rec-cut"
    launcher = subprocess.Popen(launch_command(2, record, args + ["--output", str(cut)]),
                                env=launch_env(TUNELAB_TEST_STEP_SLEEP="0.5"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (cut / "checkpoints" / "step-2" / "state.json").is_file():
            assert launcher.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.1)
        launcher.send_signal(signal.SIGKILL)  # the launcher alone: its workers run in their own session
        launcher.wait()
        workers = [r["pid"] for rank in (0, 1) for r in records(record, rank, "start")]
        deadline = time.time() + 30
        while any(_alive(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers), "workers kept running after their launcher died"
    finally:
        os.killpg(launcher.pid, signal.SIGKILL) if launcher.poll() is None else None
    assert not (cut / "final").exists()
    launch(2, tmp_path / "rec-resume", args + ["--output", str(cut), "--resume"])
    assert max_weight_diff(tmp_path / "ref", cut) <= 1e-6
    assert [m["step"] for m in metrics(cut)] == [m["step"] for m in metrics(tmp_path / "ref")]


def test_sigterm_to_the_launcher_stops_both_processes_at_one_step_with_a_checkpoint(world, tmp_path):
    """What a scheduler does before preempting a job: both workers finish the step they are in (paused mid-step 3
    here), write one checkpoint, exit 130; resuming on 2 processes ends at the uninterrupted weights."""
    args = common_args(world, "sft", "sft") + ["--max-steps", "5", "--lr", "1e-2", "train.save_every=2",
                                               "train.eval_every=0"]
    launch(2, tmp_path / "rec-ref", args + ["--output", str(tmp_path / "ref")])
    cut, marker = tmp_path / "cut", tmp_path / "paused"
    launcher = subprocess.Popen(launch_command(2, tmp_path / "rec-cut", args + ["--output", str(cut)]),
                                env=launch_env(TUNELAB_TEST_PAUSE_AT="step:3", TUNELAB_TEST_PAUSE_FILE=str(marker)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert launcher.poll() is None and time.time() < deadline, "the run never reached step 3"
            time.sleep(0.1)
        launcher.send_signal(signal.SIGTERM)
        stderr = launcher.communicate(timeout=120)[1]
    finally:
        launcher.kill() if launcher.poll() is None else None
    assert launcher.returncode != 0
    assert f"stopped by SIGTERM after step 3: checkpoint saved in {cut / 'checkpoints' / 'step-3'}" in stderr, \
        stderr[-3000:]
    assert sorted(p.name for p in (cut / "checkpoints").glob("step-*")) == ["step-2", "step-3"]
    assert not (cut / "final").exists() and not (cut / "run.lock").exists()
    launch(2, tmp_path / "rec-resume", args + ["--output", str(cut), "--resume"])
    assert max_weight_diff(tmp_path / "ref", cut) <= 1e-6


def test_a_nan_on_one_process_stops_both_with_the_message(world, tmp_path):
    args = common_args(world, "sft", "sft") + ["--max-steps", "6", "train.save_every=2", "train.eval_every=0",
                                               "--output", str(tmp_path / "run")]
    done = subprocess.run(launch_command(2, tmp_path / "rec", args), env=launch_env(TUNELAB_TEST_NAN_AT="1:3"),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    # rank 1's third batch is step 3: both processes stop there, neither waits in a collective
    assert done.stderr.count("error: the loss became nan at step 3") == 2, done.stderr[-3000:]
    assert "Last good checkpoint: " + str(tmp_path / "run" / "checkpoints" / "step-2") in done.stderr
    assert not (tmp_path / "run" / "final").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (dead, not yet reaped by init) counts as ended
    status = Path(f"/proc/{pid}/stat")
    return status.is_file() and status.read_text().split()[2] != "Z"


def test_ppo_shares_prompts_and_computes_statistics_over_the_whole_batch(world, tmp_path):
    from tunelab.losses import explained_variance, masked_whiten

    args = ["ppo", "--model", str(world["model"]), "--data", str(world["prompts"]), "--reward",
            "tests.recipes.test_ppo:letter_a_reward", "--output", str(tmp_path / "run"), "--max-steps", "2",
            "--batch-size", "8", "--peft", "none", "--quiet", "train.report=false", "ppo.minibatch_size=4",
            "ppo.epochs=2", "generation.max_new_tokens=6", "ppo.sample_every=1", "reward.normalize=true",
            "data.eval_fraction=0"]
    launch(2, tmp_path / "rec", args)
    logged = metrics(tmp_path / "run")
    assert [m["step"] for m in logged] == [1, 2]
    samples = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 * 3  # 3 samples per iteration, from the main process alone
    rollouts = [records(tmp_path / "rec", r, "rollout") for r in (0, 1)]
    whitened = [records(tmp_path / "rec", r, "whiten") for r in (0, 1)]
    for iteration in range(2):
        first, second = rollouts[0][iteration], rollouts[1][iteration]
        assert len(first["prompts"]) == len(second["prompts"]) == 4
        assert set(first["prompts"]).isdisjoint(second["prompts"])
        assert first["statistics"] == second["statistics"]  # every process logs the same global figures

        def joined(parts: list[dict], key: str) -> torch.Tensor:  # rows of both processes, padded alike
            tensors = [torch.tensor(p[key]) for p in parts]
            if tensors[0].dim() == 1:
                return torch.cat(tensors)
            width = max(t.shape[1] for t in tensors)
            return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors])
        pair = [first, second]
        scores, kl, mask = joined(pair, "scores"), joined(pair, "kl"), joined(pair, "mask")
        expected = {"score_mean": float(scores.mean()), "score_std": float(scores.std()),
                    "kl": float((kl * mask).sum(1).mean()), "eos_rate": float(joined(pair, "ended").mean()),
                    "response_length": float(mask.sum(1).mean()),
                    "explained_variance": explained_variance(joined(pair, "values"), joined(pair, "returns"), mask)}
        for key, value in expected.items():
            assert first["statistics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
            assert logged[iteration][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        inputs = [whitened[r][iteration] for r in (0, 1)]
        one_process = masked_whiten(joined(inputs, "values"), joined(inputs, "mask"))
        assert torch.allclose(joined(inputs, "result"), one_process, atol=1e-5)
        # and not what each process would get alone
        alone = masked_whiten(torch.tensor(inputs[0]["values"]), torch.tensor(inputs[0]["mask"]))
        assert not torch.allclose(alone, torch.tensor(inputs[0]["result"]), atol=1e-3)


def test_grpo_two_processes_equal_one_on_the_same_responses(world, tmp_path):
    """Each process samples whole groups for its own prompts; the loss is normalised over every process, so with
    the same responses (sampling made a function of the prompt), two processes make one process's updates."""
    args = ["grpo", "--model", str(world["model"]), "--data", str(world["prompts"]), "--reward",
            "tests.recipes.test_ppo:letter_a_reward", "--max-steps", "2", "--batch-size", "4", "--peft", "none",
            "--lr", "1e-2", "--quiet", "train.report=false", "rl.num_generations=3", "rl.epochs=2",
            "data.eval_fraction=0", "train.log_every=1", "rl.sample_every=1"]
    one = launch(1, tmp_path / "rec1", args + ["--output", str(tmp_path / "one")], TUNELAB_TEST_FIXED_ROLLOUTS="1")
    two = launch(2, tmp_path / "rec2", args + ["--output", str(tmp_path / "two")], TUNELAB_TEST_FIXED_ROLLOUTS="1")
    assert "2 prompts per process x 2" in two.stderr and "4 prompts per process x 1" in one.stderr
    first, second = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in second] == [1, 2] and first[0]["score_std"] > 0 and second[-1]["clip_fraction"] > 0
    for a, b in zip(first, second):
        for key in a.keys() - {"generate_s", "rollout_s", "learn_s", "iteration_s"}:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    # 4 AdamW steps at lr 1e-2: float-level gradient differences (rows summed in another order) on weights
    # whose gradient is near 0 are scaled up by Adam's 1 / sqrt(v), so the bound is 1e-5, not 1e-6
    assert max_weight_diff(tmp_path / "one", tmp_path / "two") <= 1e-5
    samples = (tmp_path / "two" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 * 3  # from the main process alone


def test_grpo_micro_batches_of_uneven_count_across_processes_equal_one_process(world, tmp_path):
    """Under a token budget each process splits its rows into micro-batches of its own count; only the last one's
    backward synchronises gradients (DDP decides that at the forward), so the processes still make one
    process's updates."""
    args = ["grpo", "--model", str(world["model"]), "--data", str(world["uneven_prompts"]), "--reward",
            "tests.recipes.test_ppo:letter_a_reward", "--max-steps", "2", "--batch-size", "4", "--peft", "none",
            "--lr", "1e-2", "--quiet", "train.report=false", "rl.num_generations=3", "rl.epochs=2",
            "data.eval_fraction=0", "train.log_every=1", "rl.sample_every=0", "train.micro_batch_tokens=48"]
    launch(1, tmp_path / "rec1", args + ["--output", str(tmp_path / "one")], TUNELAB_TEST_FIXED_ROLLOUTS="1")
    launch(2, tmp_path / "rec2", args + ["--output", str(tmp_path / "two")], TUNELAB_TEST_FIXED_ROLLOUTS="1")
    counts = [[r["count"] for r in records(tmp_path / "rec2", rank, "pieces")] for rank in (0, 1)]
    # per iteration: the experience pass, then 2 passes over 1 minibatch; each split its own way on each process
    assert len(counts[0]) == len(counts[1]) == 2 * 3
    assert counts[0] != counts[1] and min(counts[0] + counts[1]) > 1, counts
    first, second = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in second] == [1, 2]
    for a, b in zip(first, second):
        for key in a.keys() - {"generate_s", "rollout_s", "learn_s", "iteration_s"}:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert max_weight_diff(tmp_path / "one", tmp_path / "two") <= 1e-5


def test_ppo_micro_batches_of_uneven_count_across_processes_make_the_whole_batches_updates(world, tmp_path):
    """PPO on two processes whose rows split into different numbers of micro-batches (the first update's piece
    forwarded by the experience pass among them) makes the updates of the same run with no token budget."""
    args = ["ppo", "--model", str(world["model"]), "--data", str(world["uneven_prompts"]), "--reward",
            "tests.recipes.test_ppo:letter_a_reward", "--max-steps", "2", "--batch-size", "8", "--peft", "none",
            "--lr", "1e-3", "--quiet", "train.report=false", "ppo.minibatch_size=8", "ppo.epochs=2",
            "data.eval_fraction=0", "train.log_every=1", "ppo.sample_every=0"]
    launch(2, tmp_path / "rec-whole", args + ["--output", str(tmp_path / "whole")], TUNELAB_TEST_FIXED_ROLLOUTS="1")
    launch(2, tmp_path / "rec-split", args + ["--output", str(tmp_path / "split"), "train.micro_batch_tokens=48"],
           TUNELAB_TEST_FIXED_ROLLOUTS="1")
    counts = [[r["count"] for r in records(tmp_path / "rec-split", rank, "pieces")] for rank in (0, 1)]
    assert counts[0] != counts[1] and min(counts[0] + counts[1]) > 1, counts
    assert all(r["count"] == 1 for rank in (0, 1) for r in records(tmp_path / "rec-whole", rank, "pieces"))
    whole, split = metrics(tmp_path / "whole"), metrics(tmp_path / "split")
    assert [m["step"] for m in split] == [1, 2]
    for a, b in zip(whole, split):
        for key in ("score_mean", "kl", "policy_loss", "value_loss", "entropy", "approx_kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
    assert max_weight_diff(tmp_path / "whole", tmp_path / "split") <= 1e-5


def test_a_launch_that_forms_no_group_is_an_error(monkeypatch):
    """N processes that each come up alone would train N racing copies: refuse with how to launch."""
    import accelerate

    from tunelab import distributed

    class Alone:  # what accelerate gives a process that joined no group
        _shared_state: dict = {}
        num_processes, distributed_type = 1, "DistributedType.NO"

        def __init__(self, cpu: bool = False):
            Alone.cpu = cpu

    monkeypatch.setattr(accelerate, "PartialState", Alone)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(distributed.LaunchError, match=r"started 2 processes but they did not form one group.*torchrun"):
        distributed.state()
    assert Alone.cpu == (not torch.accelerator.is_available())  # a CPU-only machine asks for gloo


def fsdp2_launch(record: Path, args: list[str]) -> subprocess.CompletedProcess:
    done = launch(2, record, args, TUNELAB_TEST_ENGINE="fsdp2")
    prepared = records(record, 0, "prepared")[0]
    assert prepared["module"].startswith("FSDP") and prepared["units"] == 3  # the root and each decoder layer
    return done


def test_fsdp2_trains_saves_and_resumes_like_ddp(world, tmp_path):
    """Full fine-tuning under FSDP2 (parameters sharded over 2 CPU processes): clipping on the sharded
    parameters, final/ gathered whole, a checkpoint that resumes exactly."""
    args = common_args(world, "sft", "sft") + ["--max-steps", "4", "--lr", "1e-2", "--peft", "none",
                                               "train.save_every=2"]
    launch(2, tmp_path / "rec-ddp", args + ["--output", str(tmp_path / "ddp")])
    fsdp2_launch(tmp_path / "rec-fsdp", args + ["--output", str(tmp_path / "fsdp")])
    assert max_weight_diff(tmp_path / "ddp", tmp_path / "fsdp") <= 1e-6
    assert_same_curves(tmp_path / "ddp", tmp_path / "fsdp")
    assert all(m["grad_norm"] > 0 for m in metrics(tmp_path / "fsdp") if "grad_norm" in m)

    import shutil  # the same run cut after its step-2 checkpoint, then resumed
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "fsdp", cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-4")
    fsdp2_launch(tmp_path / "rec-resume", args + ["--output", str(cut), "--resume"])
    assert max_weight_diff(tmp_path / "fsdp", cut) <= 1e-6


def test_fsdp2_dpo_and_ppo_with_lora_match_ddp(world, tmp_path):
    """The adapter-disabled reference and PPO's rollouts (generation with the sharded policy gathered)."""
    dpo = common_args(world, "dpo", "pairs") + ["--max-steps", "3", "--lr", "1e-2", "lora.dropout=0"]
    launch(2, tmp_path / "rec-dpo-ddp", dpo + ["--output", str(tmp_path / "dpo-ddp")])
    fsdp2_launch(tmp_path / "rec-dpo-fsdp", dpo + ["--output", str(tmp_path / "dpo-fsdp")])
    # a sharded trunk runs each batch in one pass rather than in length buckets: float rounding only
    assert max_weight_diff(tmp_path / "dpo-ddp", tmp_path / "dpo-fsdp") <= 1e-5

    ppo = ["ppo", "--model", str(world["model"]), "--data", str(world["prompts"]), "--reward",
           "tests.recipes.test_ppo:letter_a_reward", "--max-steps", "2", "--batch-size", "8", "--quiet",
           "train.report=false", "ppo.minibatch_size=4", "generation.max_new_tokens=6", "data.eval_fraction=0",
           "lora.dropout=0", "train.save_every=2"]
    launch(2, tmp_path / "rec-ppo-ddp", ppo + ["--output", str(tmp_path / "ppo-ddp")])
    fsdp2_launch(tmp_path / "rec-ppo-fsdp", ppo + ["--output", str(tmp_path / "ppo-fsdp")])
    for a, b in zip(metrics(tmp_path / "ppo-ddp"), metrics(tmp_path / "ppo-fsdp")):
        for key in ("score_mean", "kl", "policy_loss", "value_loss", "response_length"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    assert max_weight_diff(tmp_path / "ppo-ddp", tmp_path / "ppo-fsdp") <= 1e-5


def zero_launch(stage: int, record: Path, args: list[str]) -> subprocess.CompletedProcess:
    pytest.importorskip("deepspeed")
    done = launch(2, record, args, TUNELAB_TEST_ENGINE=f"zero{stage}", PYTHONWARNINGS="ignore::FutureWarning")
    assert "processes: 2 (DEEPSPEED, gloo" in done.stderr
    return done


def test_deepspeed_zero3_accumulates_saves_and_resumes_like_ddp(world, tmp_path):
    """Parameters partitioned over the processes (ZeRO-3), two micro-batches per step: one engine step per
    optimizer step, whole parameter counts, final/ gathered, its own partitioned checkpoint resumed."""
    args = common_args(world, "sft", "sft") + ["--max-steps", "4", "--lr", "1e-2", "--peft", "none",
                                               "train.grad_accum=2", "train.save_every=2"]
    launch(2, tmp_path / "rec-ddp", args + ["--output", str(tmp_path / "ddp")])
    done = zero_launch(3, tmp_path / "rec-z3", args + ["--output", str(tmp_path / "z3")])
    assert "training 53,408 of 53,408 parameters" in done.stderr
    # ZeRO reduces and partitions gradients in another order than DDP's all-reduce: float rounding only, which
    # Adam at lr 1e-2 turns into up to ~1e-5 on the odd weight whose gradient is near 0 (the CPU's kernels decide
    # how much: 1.4e-5 measured on an AVX-512 machine, under 2e-6 on an AVX2 one); a real error moves every weight
    assert max_weight_diff(tmp_path / "ddp", tmp_path / "z3") <= 1e-4
    assert_same_curves(tmp_path / "ddp", tmp_path / "z3")

    import shutil
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "z3", cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-4")
    zero_launch(3, tmp_path / "rec-resume", args + ["--output", str(cut), "--resume"])
    assert max_weight_diff(tmp_path / "z3", cut) <= 1e-6


@pytest.mark.parametrize("peft", ["lora", "none"])
def test_deepspeed_zero3_ppo_matches_ddp(world, tmp_path, peft):
    """Rollouts from a partitioned policy (DeepSpeed's hooks fetch each layer, generate keeps the processes in
    step), and with full fine-tuning a frozen reference copy that ZeRO-3 loaded partitioned too."""
    ppo = ["ppo", "--model", str(world["model"]), "--data", str(world["prompts"]), "--reward",
           "tests.recipes.test_ppo:letter_a_reward", "--max-steps", "2", "--batch-size", "8", "--quiet",
           "train.report=false", "ppo.minibatch_size=4", "generation.max_new_tokens=6", "data.eval_fraction=0",
           "lora.dropout=0", "--peft", peft]
    launch(2, tmp_path / "rec-ddp", ppo + ["--output", str(tmp_path / "ddp")])
    zero_launch(3, tmp_path / "rec-z3", ppo + ["--output", str(tmp_path / "z3")])
    for a, b in zip(metrics(tmp_path / "ddp"), metrics(tmp_path / "z3")):
        for key in ("score_mean", "kl", "policy_loss", "value_loss", "response_length"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    assert max_weight_diff(tmp_path / "ddp", tmp_path / "z3") <= 1e-5

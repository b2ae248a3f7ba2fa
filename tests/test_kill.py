"""Runs killed (SIGKILL) or stopped (SIGINT, SIGTERM, SIGHUP) at named points of training resume with
`--resume` to the weights of an uninterrupted run (within 1e-6, LoRA dropout on).

Each run is a `tunelab` command in a child process (forked from a server that has tunelab imported, so a
start costs little), told by `TUNELAB_TEST_PAUSE_AT` to wait at one point (see `tunelab.pause`): mid-step,
after the optimizer step, halfway through a metrics line, inside a checkpoint or final/ write. The test
signals it there.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import instruction_rows, make_tiny_model_dir, max_weight_diff, write_jsonl
from tests.kill_worker import run_cli
from tunelab.jsonlog import read_jsonl

CONTEXT = multiprocessing.get_context("forkserver")
CONTEXT.set_forkserver_preload(["tests.kill_worker", "tests.recipes.test_ppo"])
KILL, INT, TERM, HUP = signal.SIGKILL, signal.SIGINT, signal.SIGTERM, signal.SIGHUP


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    model = make_tiny_model_dir(root / "model")
    data = write_jsonl(root / "train.jsonl", instruction_rows(48))
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Write a review of Film {i}.\n"} for i in range(24)])
    return model, data, prompts


def sft_argv(world, output: Path) -> list[str]:
    model, data, _ = world
    return ["sft", "--model", str(model), "--data", str(data), "--output", str(output), "--max-steps", "6",
            "--lr", "5e-3", "--batch-size", "8", "--quiet", "train.save_every=2", "train.log_every=1",
            "train.warmup_ratio=0", "train.report=false", "train.micro_batch_tokens=null", "data.max_length=192"]


def ppo_argv(world, output: Path) -> list[str]:
    model, _, prompts = world
    return ["ppo", "--model", str(model), "--data", str(prompts), "--output", str(output), "--max-steps", "3",
            "--lr", "1e-2", "--batch-size", "8", "--reward", "tests.recipes.test_ppo:letter_a_reward", "--quiet",
            "generation.max_new_tokens=6", "generation.min_new_tokens=6", "ppo.minibatch_size=4", "ppo.epochs=2",
            "ppo.sample_every=1", "train.save_every=1", "train.log_every=1", "train.warmup_ratio=0",
            "train.report=false", "data.eval_fraction=0"]


def start(argv: list[str], log: Path, env: dict[str, str] | None = None):
    process = CONTEXT.Process(target=run_cli, args=(argv, env or {}, str(log)))
    process.start()
    return process


def run(argv: list[str], log: Path) -> int:
    process = start(argv, log)
    process.join(120)
    return process.exitcode


def stop_at(argv: list[str], point: str, signals: list[int], log: Path) -> int:
    """Run until the pause point, send `signals` there (a moment apart), and return the exit code."""
    marker = log.with_suffix(".paused")
    env = {"TUNELAB_TEST_PAUSE_AT": point, "TUNELAB_TEST_PAUSE_FILE": str(marker)}
    if len(signals) > 1:
        env["TUNELAB_TEST_PAUSE_HOLD"] = "1"  # still mid-step when the second signal comes
    process = start(argv, log, env)
    wait_until(lambda: marker.exists(), process, log)
    for i, signum in enumerate(signals):
        os.kill(process.pid, signum)
        if i + 1 < len(signals):
            wait_until(lambda: "received" in log.read_text(), process, log)
    process.join(120)
    return process.exitcode


def wait_until(condition, process, log: Path) -> None:
    deadline = time.time() + 120
    while not condition():
        assert process.is_alive(), f"the run ended too early:\n{log.read_text()}"
        assert time.time() < deadline, "the run never got there"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory):
    """Uninterrupted sft and ppo runs, the references."""
    root = tmp_path_factory.mktemp("straight")
    for name, argv in (("sft", sft_argv), ("ppo", ppo_argv)):
        assert run(argv(world, root / name), root / f"{name}.log") == 0, (root / f"{name}.log").read_text()
    return root


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))


def resume_and_compare(argv: list[str], run_dir: Path, reference: Path, log: Path, steps: int) -> str:
    """Resume the stopped run; it must end at the reference's weights with a complete, clean log."""
    assert run(argv + ["--resume"], log) == 0, log.read_text()
    diff = max_weight_diff(run_dir, reference)
    print(f"max weight difference after resume: {diff:.3g}")
    assert diff <= 1e-6, diff
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r or "score_mean" in r] \
        == list(range(1, steps + 1))
    assert (run_dir / "final" / "manifest.json").is_file()
    assert not list(run_dir.glob(".tmp-*")) and not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert not (run_dir / "run.lock").exists()
    return log.read_text()


SFT_CASES = [  # (pause point, signals, exit code, newest checkpoint left, what the resume says)
    ("step:3", [KILL], -9, 2, "resumed from"),
    ("optimizer:4", [KILL], -9, 2, "resumed from"),
    ("metrics:3", [KILL], -9, 2, "ends in a partial line"),
    ("checkpoint:2", [KILL], -9, 2, "resumed from"),
    ("checkpoint-done:2", [KILL], -9, 2, "resumed from"),
    ("final:1", [KILL], -9, 6, "(step 6/6)"),
    ("step:3", [INT], 130, 3, "resumed from"),
    ("optimizer:4", [TERM], 130, 4, "resumed from"),
    ("metrics:5", [HUP], 130, 5, "resumed from"),
    ("checkpoint:1", [TERM], 130, 2, "resumed from"),
    ("step:3", [INT, INT], 130, 2, "resumed from"),
]


@pytest.mark.parametrize("point,signals,code,newest,said", SFT_CASES,
                         ids=[f"{c[0]}-{'+'.join(signal.Signals(s).name for s in c[1])}" for c in SFT_CASES])
def test_sft_stopped_anywhere_resumes_to_the_uninterrupted_weights(world, straight, tmp_path, point, signals, code,
                                                                   newest, said):
    run_dir = tmp_path / "run"
    argv = sft_argv(world, run_dir)
    assert stop_at(argv, point, signals, tmp_path / "stopped.log") == code
    stopped = (tmp_path / "stopped.log").read_text()
    assert checkpoint_steps(run_dir)[-1] == newest
    assert not (run_dir / "final").exists()  # nothing that looks finished
    if signals == [INT, INT]:
        assert "stopped at once during step 3" in stopped
    elif code == 130:
        assert f"stopped by {signal.Signals(signals[0]).name} after step {newest}: checkpoint saved in " \
               f"{run_dir / 'checkpoints' / f'step-{newest}'}" in stopped
    assert said in resume_and_compare(argv, run_dir, straight / "sft", tmp_path / "resumed.log", 6)


PPO_CASES = [
    ("optimizer:6", [INT], 130, 2),  # the second iteration's second update: the iteration is finished first
    ("optimizer:3", [KILL], -9, 0),
    ("metrics:2", [TERM], 130, 2),
    ("final:1", [KILL], -9, 3),  # after the last iteration's checkpoint: the resume writes final/ and the summary
]


@pytest.mark.parametrize("point,signals,code,newest", PPO_CASES,
                         ids=[f"{c[0]}-{signal.Signals(c[1][0]).name}" for c in PPO_CASES])
def test_ppo_stopped_mid_iteration_resumes_to_the_uninterrupted_weights(world, straight, tmp_path, point, signals,
                                                                        code, newest):
    run_dir = tmp_path / "run"
    argv = ppo_argv(world, run_dir)
    assert stop_at(argv, point, signals, tmp_path / "stopped.log") == code
    assert (checkpoint_steps(run_dir) or [0])[-1] == newest
    if not newest:  # killed before any checkpoint: nothing to resume, start again
        assert run(argv + ["--resume"], tmp_path / "resume.log") == 2
        assert "error: nothing to resume in" in (tmp_path / "resume.log").read_text()
        argv = argv + ["--overwrite"]
        assert run(argv, tmp_path / "again.log") == 0
        diff = max_weight_diff(run_dir, straight / "ppo")
        print(f"max weight difference after starting again: {diff:.3g}")
        assert diff <= 1e-6, diff
        return
    said = resume_and_compare(argv, run_dir, straight / "ppo", tmp_path / "resumed.log", 3)
    assert "ppo done: 3 iterations; score " in said


def test_a_second_run_into_a_live_runs_folder_is_refused_and_a_dead_runs_lock_taken_over(world, tmp_path):
    run_dir = tmp_path / "run"
    argv = sft_argv(world, run_dir)
    marker = tmp_path / "paused"
    first = start(argv, tmp_path / "first.log", {"TUNELAB_TEST_PAUSE_AT": "step:3",
                                                   "TUNELAB_TEST_PAUSE_FILE": str(marker)})
    wait_until(lambda: marker.exists(), first, tmp_path / "first.log")
    for extra in (["--overwrite"], ["--resume"]):
        assert run(argv + extra, tmp_path / "second.log") == 2
        assert f"is in use by process {first.pid} on host" in (tmp_path / "second.log").read_text()
    assert checkpoint_steps(run_dir) == [2]  # the live run's folder is untouched
    first.kill()
    first.join(60)
    assert run(argv + ["--resume"], tmp_path / "third.log") == 0
    assert f"taking over the lock of process {first.pid}" in (tmp_path / "third.log").read_text()

"""What a run leaves on disk when something goes wrong, and what `--resume` checks before it continues:
torn metrics lines, damaged checkpoints, changed configs, a finished-but-unsaved run, a full disk, NaN."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tunelab.checkpoint as checkpoint_module
import tunelab.recipes.common as common_module
import tunelab.recipes.sft as sft_module
from tests.helpers import final_weights, instruction_rows, make_tiny_model_dir, sft_config, write_jsonl
from tunelab.checkpoint import RunDir, RunDirError
from tunelab.cli import main
from tunelab.jsonlog import JsonlError, read_jsonl
from tunelab.loop import TrainingError
from tunelab.recipes.sft import run_sft
from tunelab.report import write_report

TRAIN = dict(max_steps=4, save_every=2, keep_last=3, lr=5e-3, micro_batch_tokens=None)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    return make_tiny_model_dir(root / "model"), write_jsonl(root / "train.jsonl", instruction_rows(48))


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory):
    """An uninterrupted 4-step run (checkpoints at 2 and 4), the reference."""
    model, data = world
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run_sft(sft_config(model, data, run_dir, **TRAIN), quiet=True)
    return run_dir


def assert_same_weights(a, b):
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6


def stopped_copy(world, tmp_path):
    """A run like `straight` as a kill after its last checkpoint leaves it: everything but final/."""
    model, data = world
    config = sft_config(model, data, tmp_path / "run", **TRAIN)
    run_sft(config, quiet=True)
    shutil.rmtree(tmp_path / "run" / "final")
    return config


def test_a_run_killed_before_final_is_finished_by_resume(world, straight, tmp_path, capsys):
    config = stopped_copy(world, tmp_path)
    capsys.readouterr()
    result = run_sft(config, resume=True, quiet=True)
    err = capsys.readouterr().err
    assert "(step 4/4)" in err and "sft done: 4 steps" in err and "last train loss" in err
    assert result.train.train_loss == pytest.approx(read_jsonl(tmp_path / "run" / "metrics.jsonl")[3]["loss"])
    assert (tmp_path / "run" / "final" / "manifest.json").is_file()
    assert not (tmp_path / "run" / "run.lock").exists()  # released when the run ends, the process lives on
    assert_same_weights(tmp_path / "run", straight)


def test_a_torn_last_metrics_line_is_dropped_by_resume_and_by_report(world, straight, tmp_path, capsys):
    config = stopped_copy(world, tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with metrics.open("a") as handle:
        handle.write('{"step": 5, "loss": 6.2, "lr')  # a kill mid-append
    report = write_report([tmp_path / "run"])
    assert report.is_file() and "ends in a partial line" in capsys.readouterr().err
    run_sft(config, resume=True, quiet=True)
    assert "ends in a partial line" in capsys.readouterr().err
    assert [r["step"] for r in read_jsonl(metrics) if "loss" in r] == [1, 2, 3, 4]
    assert metrics.read_text().endswith("\n")


def test_a_bad_line_before_the_end_of_metrics_is_an_error_naming_it(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(JsonlError, match=r"metrics.jsonl line 2 is not JSON"):
        read_jsonl(path)
    assert main(["report", str(tmp_path)]) == 2
    assert "tunelab report: error: " in capsys.readouterr().err


def _flip_byte(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["bit flip", "truncated"])
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(world, straight, tmp_path, capsys, damage):
    config = stopped_copy(world, tmp_path)
    newest = tmp_path / "run" / "checkpoints" / "step-4"
    if damage == "bit flip":
        _flip_byte(newest / "trainable.safetensors")
        problem = "trainable.safetensors does not match its checksum"
    else:
        optimizer = newest / "optimizer.pt"
        os.truncate(optimizer, optimizer.stat().st_size // 2)
        problem = "optimizer.pt is"
    capsys.readouterr()
    run_sft(config, resume=True, quiet=True)
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is damaged ({problem}" in err
    assert f"resuming from {newest.with_name('step-2')}, the newest checkpoint that is intact" in err
    assert (tmp_path / "run" / "checkpoints" / "damaged-step-4").is_dir()
    assert_same_weights(tmp_path / "run", straight)


def test_no_intact_checkpoint_is_a_clear_error(world, straight, tmp_path):
    config = stopped_copy(world, tmp_path)
    for step in (2, 4):
        (tmp_path / "run" / "checkpoints" / f"step-{step}" / "scheduler.pt").write_bytes(b"")
    with pytest.raises(RunDirError, match=r"nothing to resume in .*: no intact checkpoint \(step-4: scheduler.pt is "
                                          r"0 bytes, \d+ were written .*; step-2: scheduler.pt is 0 bytes"):
        run_sft(config, resume=True, quiet=True)


def test_a_checkpoint_from_before_manifests_is_resumed_unchecked(world, straight, tmp_path, capsys):
    config = stopped_copy(world, tmp_path)
    for step in (2, 4):
        (tmp_path / "run" / "checkpoints" / f"step-{step}" / "manifest.json").unlink()
    capsys.readouterr()
    run_sft(config, resume=True, quiet=True)
    assert "step-4 has no manifest.json (written by an earlier tunelab)" in capsys.readouterr().err
    assert_same_weights(tmp_path / "run", straight)


def cli_args(world, output, *extra):
    model, data = world
    return ["sft", "--model", str(model), "--data", str(data), "--output", str(output), "--lr", "5e-3", "--quiet",
            "--max-steps", "4", "train.save_every=2", "train.micro_batch_tokens=null", "data.max_length=192",
            "train.report=false", *extra]


def test_resume_refuses_a_different_run_and_lists_each_difference(world, tmp_path, capsys):
    model, data = world
    other = write_jsonl(tmp_path / "other.jsonl", instruction_rows(40, seed=1))
    assert main(cli_args(world, tmp_path / "run", "--max-steps", "2")) == 0
    capsys.readouterr()
    changed = ["--batch-size", "4", "train.seed=1", "lora.r=4", "--data", str(other)]
    assert main(cli_args(world, tmp_path / "run", "--resume", *changed)) == 2
    err = capsys.readouterr().err
    assert "tunelab sft: error: resume=True (--resume) would continue a different run: " in err
    for difference in ("train.batch_size: 8 -> 4", "train.seed: 0 -> 1", "lora.r: 8 -> 4", "data.sources: "):
        assert difference in err, difference
    assert "pass allow_changes=True (--allow-changes) to continue with these" in err
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["batch_size"] == 8 and saved["train"]["seed"] == 0  # the run is left as it was


def test_resume_allows_and_lists_changes_that_keep_the_run(world, tmp_path, capsys):
    assert main(cli_args(world, tmp_path / "run", "--max-steps", "2")) == 0
    capsys.readouterr()
    assert main(cli_args(world, tmp_path / "run", "--resume", "train.log_every=2")) == 0
    err = capsys.readouterr().err
    assert "resume: continuing with train.log_every: 10 -> 2; train.max_steps: 2 -> 4" in err
    assert main(cli_args(world, tmp_path / "run", "--resume", "--max-steps", "5", "train.seed=3",
                         "--allow-changes")) == 0
    assert "warning: resume with allow_changes=True (--allow-changes): train.seed: 0 -> 3" in capsys.readouterr().err


def _exploding_gradient_at(call: int):
    """sft_step whose gradients are infinite at call `call` (the loss itself stays finite)."""
    real, calls = sft_module.sft_step, {"n": 0}

    def step(module, batch):
        calls["n"] += 1
        loss, metrics = real(module, batch)
        if calls["n"] == call:
            loss.register_hook(lambda grad: grad * float("inf"))
        return loss, metrics
    return step


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_exploding_weights_are_never_saved_as_the_last_good_checkpoint(world, tmp_path, monkeypatch, max_grad_norm):
    model, data = world
    monkeypatch.setattr(sft_module, "sft_step", _exploding_gradient_at(4))  # step 4 saves a checkpoint
    config = sft_config(model, data, tmp_path / "run", **{**TRAIN, "max_grad_norm": max_grad_norm})
    said = "gradient norm became" if max_grad_norm else "weights became NaN or infinite after step 4"
    with pytest.raises(TrainingError, match=rf"{said}.*Last good checkpoint: .*step-2\b"):
        run_sft(config, quiet=True)
    run = RunDir(tmp_path / "run")
    assert [p.name for p in run.checkpoint_dirs()] == ["step-2"]
    assert all(torch.isfinite(t).all() for t in load_file(run.checkpoints / "step-2" / "trainable.safetensors")
               .values())
    assert not run.final.exists()


def test_an_infinite_learning_rate_never_writes_nan_weights_to_final(world, tmp_path):
    model, data = world
    config = sft_config(model, data, tmp_path / "run", max_steps=1, micro_batch_tokens=None)
    config.train.__dict__["lr"] = float("inf")  # past the config's own checks: the loop must catch it too
    with pytest.raises(TrainingError, match=r"the trained weights hold NaN or infinity .*final/ was not written"):
        run_sft(config, quiet=True)
    assert not (tmp_path / "run" / "final").exists()


def _no_space_on(call: int, real):
    calls = {"n": 0}

    def write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)
    return write


def test_a_full_disk_during_a_checkpoint_is_a_clear_error_and_keeps_the_last_good_one(world, tmp_path, monkeypatch):
    model, data = world
    # save_file writes the weights and then the RNG state of each checkpoint: call 3 is the second's weights
    monkeypatch.setattr(checkpoint_module, "save_file", _no_space_on(3, checkpoint_module.save_file))
    with pytest.raises(RunDirError, match=r"no space left on the device while writing checkpoint step-4: it needs "
                                          r"about [\d.]+ kB and .* is free in .*checkpoints; nothing of it was kept, "
                                          r"the last good checkpoint .*step-2 is intact"):
        run_sft(sft_config(model, data, tmp_path / "run", **TRAIN), quiet=True)
    run = RunDir(tmp_path / "run")
    assert [p.name for p in run.checkpoint_dirs()] == ["step-2"]
    assert not list(run.checkpoints.glob(".tmp-*")) and not run.final.exists()


def test_a_full_disk_while_writing_final_leaves_no_final(world, tmp_path, monkeypatch):
    model, data = world
    # the two checkpoints save their model/ first: call 3 is final/'s
    monkeypatch.setattr(common_module, "save_pretrained", _no_space_on(3, common_module.save_pretrained))
    with pytest.raises(RunDirError, match=r"no space left on the device while writing final/: it needs about .* "
                                          r"the last good checkpoint .*step-4 is intact"):
        run_sft(sft_config(model, data, tmp_path / "run", **TRAIN), quiet=True)
    assert not (tmp_path / "run" / "final").exists() and not list((tmp_path / "run").glob(".tmp-*"))


def test_a_full_disk_while_appending_metrics_is_a_clear_error(world, tmp_path, monkeypatch):
    model, data = world
    import tunelab.loop as loop_module

    monkeypatch.setattr(loop_module, "append_jsonl", _no_space_on(3, loop_module.append_jsonl))
    with pytest.raises(RunDirError, match=r"no space left on the device while writing a line of metrics.jsonl: it "
                                          r"needs about \d+ bytes .* the last good checkpoint .*step-2 is intact"):
        run_sft(sft_config(model, data, tmp_path / "run", **TRAIN), quiet=True)

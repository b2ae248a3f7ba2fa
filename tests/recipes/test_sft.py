"""SFT recipe and the shared loop: learning, exact resume, crash safety, final/ loading, CLI."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
import yaml

import tunelab.checkpoint as checkpoint_module
import tunelab.recipes.sft as sft_module
from tests.helpers import final_weights, instruction_rows, make_tiny_model_dir, sft_config, write_jsonl
from tunelab.checkpoint import RunDir, RunDirError
from tunelab.cli import main
from tunelab.loop import TrainingError, lr_factor
from tunelab.stopping import Interrupted
from tunelab.recipes.sft import run_sft


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    model_dir = make_tiny_model_dir(root / "model")
    data = write_jsonl(root / "train.jsonl", instruction_rows(80))
    return model_dir, data


def metrics(run_dir, split=None):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m.get("split") == split]


def test_full_finetuning_loss_falls(world_dir, tmp_path):
    model_dir, data = world_dir
    result = run_sft(sft_config(model_dir, data, tmp_path / "run", peft="none", max_steps=30, lr=1e-2), quiet=True)
    train = metrics(tmp_path / "run")
    assert [m["step"] for m in train] == list(range(1, 31))
    first, last = sum(m["loss"] for m in train[:3]) / 3, sum(m["loss"] for m in train[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert result.train.eval_metrics["loss"] < first
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_grad_accumulation_matches_one_large_batch(world_dir, tmp_path):
    """The loss of a step is normalised over the whole accumulated batch, so 2 x 4 == 1 x 8."""
    model_dir, data = world_dir
    big = sft_config(model_dir, data, tmp_path / "big", peft="none", batch_size=8, max_steps=3,
                     group_by_length=False)
    small = sft_config(model_dir, data, tmp_path / "small", peft="none", batch_size=4, grad_accum=2, max_steps=3,
                       group_by_length=False)
    for config in (big, small):
        run_sft(config, quiet=True)
    # Adam turns float noise in near-zero gradients into full-size steps, so compare what the updates
    # do: the per-step losses, which after step 1 depend on the updated weights.
    big_losses = [m["loss"] for m in metrics(tmp_path / "big")]
    small_losses = [m["loss"] for m in metrics(tmp_path / "small")]
    assert len(big_losses) == 3
    assert big_losses == pytest.approx(small_losses, abs=1e-4)
    assert big_losses[2] < big_losses[0]


def _signalling_step(at_call: int, signum: int):
    """sft_step, sending this process `signum` in the middle of call number `at_call` (mid-step)."""
    calls = {"n": 0}
    real = sft_module.sft_step

    def step(module, batch):
        calls["n"] += 1
        if calls["n"] == at_call:
            os.kill(os.getpid(), signum)
        return real(module, batch)
    return step


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_ends_the_step_saves_and_resume_ends_with_identical_weights(world_dir, tmp_path, monkeypatch,
                                                                                  signum):
    model_dir, data = world_dir
    # LoRA dropout makes the RNG state matter; one micro-batch per step, so 5 step calls are 5 steps
    train = dict(max_steps=8, lr=5e-3, save_every=0, micro_batch_tokens=None)
    run_sft(sft_config(model_dir, data, tmp_path / "straight", **train), quiet=True)

    monkeypatch.setattr(sft_module, "sft_step", _signalling_step(5, signum))
    with pytest.raises(Interrupted):
        run_sft(sft_config(model_dir, data, tmp_path / "resumed", **train), quiet=True)
    run = RunDir(tmp_path / "resumed")
    assert run.latest_checkpoint().name == "step-5"  # step 5 finished, then the stop
    assert not run.final.exists()  # nothing that looks complete
    monkeypatch.undo()

    run_sft(sft_config(model_dir, data, tmp_path / "resumed", **train), resume=True, quiet=True)
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert [m["step"] for m in metrics(tmp_path / "resumed")] == list(range(1, 9))


def test_crash_during_checkpoint_save_keeps_previous_checkpoint(world_dir, tmp_path, monkeypatch):
    model_dir, data = world_dir
    real_save = torch.save
    saves = {"n": 0}

    def failing_save(obj, path, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 3:  # optimizer.pt of the second checkpoint: mid-save
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *args, **kwargs)

    config = sft_config(model_dir, data, tmp_path / "run", peft="none", max_steps=6, save_every=2, keep_last=5)
    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    with pytest.raises(RunDirError, match=r"could not write checkpoint step-4 .*disk full \(simulated\).*"
                                          r"last good checkpoint .*step-2 is intact"):
        run_sft(config, quiet=True)
    monkeypatch.undo()
    run = RunDir(tmp_path / "run")
    assert [p.name for p in run.checkpoint_dirs()] == ["step-2"]
    assert not run.final.exists()

    run_sft(config, resume=True, quiet=True)  # the previous checkpoint is valid and resumable
    straight = sft_config(model_dir, data, tmp_path / "straight", peft="none", max_steps=6, save_every=2,
                          keep_last=5)
    run_sft(straight, quiet=True)
    a, b = final_weights(tmp_path / "run"), final_weights(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in run.checkpoint_dirs()] == ["step-2", "step-4", "step-6"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_nan_loss_stops_with_a_clear_message_and_keeps_last_checkpoint(world_dir, tmp_path, monkeypatch):
    model_dir, data = world_dir
    real = sft_module.sft_step
    calls = {"n": 0}

    def nan_step(module, batch):
        calls["n"] += 1
        loss, metrics_ = real(module, batch)
        return (loss * float("nan") if calls["n"] == 3 else loss), metrics_

    monkeypatch.setattr(sft_module, "sft_step", nan_step)
    with pytest.raises(TrainingError, match=r"loss became nan at step 3.*step-2"):
        run_sft(sft_config(model_dir, data, tmp_path / "run", max_steps=6, save_every=2, micro_batch_tokens=None),
                quiet=True)
    assert RunDir(tmp_path / "run").latest_checkpoint().name == "step-2"
    assert not (tmp_path / "run" / "final").exists()


def test_final_lora_adapter_loads_with_plain_peft(world_dir, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model_dir, data = world_dir
    result = run_sft(sft_config(model_dir, data, tmp_path / "run", max_steps=4), quiet=True)
    monkeypatch.chdir(tmp_path)  # the adapter must not depend on the working directory
    model = AutoPeftModelForCausalLM.from_pretrained(result.final_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.final_dir)
    ids = tokenizer("Write a review of The Glass Fox.", return_tensors="pt")["input_ids"]
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    adapter = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(model_dir.resolve())
    assert adapter["r"] == 8 and adapter["peft_type"] == "LORA"
    # the trained adapter changes the output relative to the base model
    with model.disable_adapter():
        base_logits = model(input_ids=ids).logits
    assert not torch.allclose(logits, base_logits)


def test_lr_schedule_warms_up_then_decays_to_zero():
    assert lr_factor(0, 4, 20, "cosine") == pytest.approx(1 / 5)
    assert lr_factor(3, 4, 20, "cosine") == pytest.approx(4 / 5)
    assert lr_factor(4, 4, 20, "cosine") == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, "cosine") == pytest.approx(0.5)
    assert lr_factor(12, 4, 20, "linear") == pytest.approx(0.5)
    assert lr_factor(20, 4, 20, "linear") == pytest.approx(0.0)
    assert lr_factor(15, 4, 20, "constant") == 1.0
    assert math.isclose(lr_factor(20, 0, 20, "cosine"), 0.0, abs_tol=1e-12)


def test_cli_sft_overrides_reach_the_resolved_config(world_dir, tmp_path, capsys):
    model_dir, data = world_dir
    out = tmp_path / "run"
    code = main(["sft", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--max-steps", "2",
                 "--batch-size", "4", "--quiet", "lora.r=4", "train.lr=2e-4", "data.max_length=64"])
    assert code == 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["lora"]["r"] == 4 and resolved["train"]["lr"] == 2e-4
    assert resolved["train"]["batch_size"] == 4 and resolved["data"]["max_length"] == 64
    assert json.loads((out / "final" / "adapter_config.json").read_text())["r"] == 4
    assert capsys.readouterr().out.strip() == str(out / "final")


def test_cli_errors_name_what_is_wrong_and_leave_no_run(world_dir, tmp_path, capsys):
    model_dir, data = world_dir
    out = tmp_path / "run"
    assert main(["sft", "--model", str(tmp_path / "missing"), "--data", str(data), "--output", str(out)]) == 2
    assert "model path does not exist" in capsys.readouterr().err
    assert main(["sft", "--model", str(model_dir), "--data", str(data), "--output", str(out), "lora.rank=4"]) == 2
    assert "did you mean 'lora.r'" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("x")
    assert main(["sft", "--model", str(model_dir), "--data", str(data), "--output", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_sft_help_documents_every_flag_and_config_key(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--data", "--output", "--config", "--max-steps", "--epochs", "--lr", "--batch-size",
                 "--peft", "--resume", "--allow-changes", "key=value"):
        assert flag in text, flag
    for key in ("lora.r", "train.lr", "data.max_length", "data.train_on_prompt", "model.gradient_checkpointing"):
        assert key in text, key


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_gradient_checkpointing_gives_the_same_training(world_dir, tmp_path, peft):
    model_dir, data = world_dir
    plain = sft_config(model_dir, data, tmp_path / "plain", peft=peft, max_steps=3, lr=5e-3)
    plain.lora.dropout = 0.0
    recomputed = plain.model_copy(deep=True)
    recomputed.output = str(tmp_path / "recomputed")
    recomputed.model.gradient_checkpointing = True
    run_sft(plain, quiet=True)
    run_sft(recomputed, quiet=True)
    a = [m["loss"] for m in metrics(tmp_path / "plain")]
    b = [m["loss"] for m in metrics(tmp_path / "recomputed")]
    assert a == pytest.approx(b, abs=1e-5)
    assert a[-1] < a[0]


def test_bf16_autocast_trains_close_to_fp32(world_dir, tmp_path):
    model_dir, data = world_dir
    fp32 = sft_config(model_dir, data, tmp_path / "fp32", peft="none", max_steps=4, lr=5e-3)
    bf16 = fp32.model_copy(deep=True)
    bf16.output, bf16.train.precision = str(tmp_path / "bf16"), "bf16"
    run_sft(fp32, quiet=True)
    run_sft(bf16, quiet=True)
    a = [m["loss"] for m in metrics(tmp_path / "fp32")]
    b = [m["loss"] for m in metrics(tmp_path / "bf16")]
    assert a[0] == pytest.approx(b[0], rel=0.01)  # same weights, bf16 matmuls: within 1%
    assert b[-1] < b[0]


@pytest.mark.parametrize("command,options", [
    ("rm", ["--model", "--data", "--output", "reward.center_coef"]),
    ("dpo", ["--ref", "dpo.beta", "dpo.loss", "dpo.precompute_ref", "dpo.gamma", "simpo", "orpo"]),
    ("kto", ["--ref", "kto.beta", "kto.desirable_weight", "kto.undesirable_weight", "label"]),
    ("ppo", ["--reward", "ppo.kl_coef", "generation.max_new_tokens", "ppo.critic"]),
    ("generate", ["--prompts", "--temperature", "--top-k", "--top-p", "--num-beams", "--repetition-penalty",
                  "--min-new-tokens", "--max-new-tokens", "--seed"]),
    ("chat", ["--system", "--temperature"]),
    ("eval", ["--reward", "--compare", "--ref", "--few-shot"]),
    ("score", ["--model", "--data", "--output"]),
    ("merge", ["--output"]),
    ("report", ["--output"]),
    ("inspect", ["--n", "--no-color"]),
    ("demo", ["--quick", "--output"]),
])
def test_every_command_documents_its_options(command, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in options:
        assert option in text, option

"""GRPO and RLOO end to end: learning a programmatic reward with bounded KL, no value head, the old-log-prob
shortcut, resume, and clear errors."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import make_tiny_model_dir, write_jsonl
from tests.recipes.test_ppo import letter_a_reward
from tunelab.cli import main
from tunelab.config import DataConfig, DataSource, GRPOConfig, ModelConfig, RLOOConfig, TrainConfig
from tunelab.loop import TrainingError
from tunelab.recipes.grpo import group_experience, learn_group, run_group_rl


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("grpo") / "model")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    rows = [{"prompt": f"Write a review of Film {i}.\n"} for i in range(64)]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)


def group_config(cls, model, prompts, output, steps: int = 25, **rl) -> GRPOConfig:
    config = cls(model=ModelConfig(name_or_path=str(model)), output=str(output), peft="none",
                 data=DataConfig(sources=[DataSource(path=str(prompts))], eval_fraction=0.0),
                 train=TrainConfig(lr=1e-2, batch_size=8, max_steps=steps, warmup_ratio=0.0, log_every=10,
                                   report=False))
    config.reward.source = "tests.recipes.test_ppo:letter_a_reward"
    config.generation.max_new_tokens = 8
    config.generation.min_new_tokens = 8
    config.rl.sample_every = 0
    for key, value in rl.items():
        setattr(config.rl, key, value)
    return config


@pytest.mark.parametrize("cls", [GRPOConfig, RLOOConfig], ids=["grpo", "rloo"])
def test_group_rl_raises_the_reward_with_bounded_kl(cls, tiny_dir, prompts, tmp_path):
    result = run_group_rl(group_config(cls, tiny_dir, prompts, tmp_path / "run"), quiet=True)
    history = result.history
    assert len(history) == 25
    first = sum(h["score_mean"] for h in history[:5]) / 5
    last = sum(h["score_mean"] for h in history[-5:]) / 5
    assert last > first + 0.5, (first, last)
    assert all(h["kl"] < 15 for h in history), [h["kl"] for h in history]
    for h in history:
        assert 0 <= h["zero_spread_groups"] <= 1 and h["updates"] == 1 and h["response_length"] == 8
        assert 0 < h["generate_s"] <= h["rollout_s"]
    assert (result.final_dir / "model.safetensors").is_file()
    # no value head and no critic in what was trained
    saved = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert "value_loss" not in saved and "explained_variance" not in saved


def fake_loop(model_dir, budget=None):
    """What `learn_group` and `group_experience` use of the loop, with a plain SGD step that records each
    gradient (so two computations can be compared update by update)."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from tunelab.recipes.ppo import PolicyWithValueHead

    module = PolicyWithValueHead(AutoModelForCausalLM.from_pretrained(model_dir), value_head=False).eval()
    grads: list[torch.Tensor] = []

    def optimizer_step():
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters()]))
        with torch.no_grad():
            for p in module.parameters():
                p -= 0.5 * p.grad
        module.zero_grad(set_to_none=True)
    loop = SimpleNamespace(module=module, raw=module, accelerator=Accelerator(), budget=budget,
                           device=torch.device("cpu"), desc="grpo", optimizer_step=optimizer_step)
    return loop, grads


def test_old_logprobs_of_the_first_minibatch_come_from_its_own_forward(tiny_dir, tmp_path):
    """The shortcut (no separate pass for the first minibatch) gives the gradients of the plain computation."""
    from tunelab.modeling import load_tokenizer
    from tunelab.rollout import sample_rollouts

    config = group_config(GRPOConfig, tiny_dir, tmp_path / "unused.jsonl", tmp_path / "run", epochs=2,
                          minibatch_size=6, num_generations=3)
    loop, grads = fake_loop(tiny_dir, budget=40)  # a small budget: several micro-batches per minibatch
    tokenizer = load_tokenizer(config.model)
    torch.manual_seed(0)
    rollout = sample_rollouts(loop.module.policy, tokenizer, [f"Write a review of Film {i}.\n" for i in range(4)
                                                              for _ in range(3)], max_new_tokens=6)
    scores = torch.tensor(letter_a_reward(rollout.prompts, rollout.responses))
    order = torch.randperm(12)
    start = {k: v.clone() for k, v in loop.module.state_dict().items()}
    reference = copy.deepcopy(loop.module.policy).requires_grad_(False)
    shortcut = group_experience(loop, reference, rollout, scores, config, order[:6])
    assert int(shortcut["known_old"].sum()) == 6  # only the other six rows had a separate pass
    torch.manual_seed(1)  # the second pass's order
    learned = learn_group(loop, shortcut, config, order)
    assert learned["clip_fraction"] > 0  # the updates moved the policy: later passes had ratios away from 1
    loop.module.load_state_dict(start)
    plain = group_experience(loop, reference, rollout, scores, config, order[:0])  # every row's old log-probs first
    assert bool(plain["known_old"].all())
    torch.manual_seed(1)
    plain_learned = learn_group(loop, plain, config, order)
    assert learned["updates"] == plain_learned["updates"] == 4  # 2 passes x 2 minibatches of 6
    half = len(grads) // 2
    for a, b in zip(grads[:half], grads[half:]):
        assert torch.allclose(a, b, atol=1e-6) and a.abs().max() > 0
    assert torch.allclose(shortcut["tensors"]["old_logprobs"], plain["tensors"]["old_logprobs"], atol=1e-5)
    assert learned["loss"] == pytest.approx(plain_learned["loss"], abs=1e-6)


def test_kl_off_loads_no_reference_and_lora_disables_the_adapter(tiny_dir, prompts, tmp_path, monkeypatch, capsys):
    from tunelab.recipes import online

    loads = []
    real = online.load_lm
    monkeypatch.setattr(online, "load_lm", lambda *a, **k: loads.append(1) or real(*a, **k))
    result = run_group_rl(group_config(GRPOConfig, tiny_dir, prompts, tmp_path / "off", steps=2, kl="off"))
    assert loads == [] and "kl" not in result.history[-1]
    assert "reference: none (no KL term)" in capsys.readouterr().err
    run_group_rl(group_config(GRPOConfig, tiny_dir, prompts, tmp_path / "full", steps=1))
    assert loads == [1] and "reference: frozen copy" in capsys.readouterr().err
    config = group_config(RLOOConfig, tiny_dir, prompts, tmp_path / "lora", steps=2)
    config.peft = "lora"
    lora = run_group_rl(config)
    assert loads == [1] and "adapter disabled (no second copy)" in capsys.readouterr().err
    assert lora.history[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # LoRA B starts at 0: the policy is the reference
    assert (lora.final_dir / "adapter_model.safetensors").is_file()


def test_resume_ends_where_an_uninterrupted_run_ends(tiny_dir, prompts, tmp_path):
    from safetensors.torch import load_file

    args = ["grpo", "--model", str(tiny_dir), "--data", str(prompts), "--reward",
            "tests.recipes.test_ppo:letter_a_reward", "--max-steps", "4", "--batch-size", "4", "--peft", "none",
            "--lr", "1e-2", "--quiet", "generation.max_new_tokens=6", "train.save_every=2", "rl.sample_every=2",
            "rl.epochs=2", "rl.minibatch_size=8", "train.report=false"]
    assert main(args + ["--output", str(tmp_path / "whole")]) == 0
    assert main(args + ["--output", str(tmp_path / "cut"), "--max-steps", "4"]) == 0
    cut = tmp_path / "cut"
    # as if killed after the checkpoint of iteration 2
    import shutil
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-4")
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")  # iterations 1, 2 and a stray 3
    assert main(args + ["--output", str(cut), "--resume"]) == 0
    whole, resumed = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("whole", "cut"))
    assert max(float((whole[k] - resumed[k]).abs().max()) for k in whole) == 0
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    samples = [json.loads(line) for line in (cut / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [1, 2, 4]


def test_bad_settings_and_misbehaving_rewards_are_clear(tiny_dir, prompts, tmp_path, capsys):
    base = ["--model", str(tiny_dir), "--data", str(prompts), "--max-steps", "1", "--batch-size", "2", "--quiet",
            "--peft", "none", "generation.max_new_tokens=4"]
    assert main(["grpo", *base, "--output", str(tmp_path / "a"), "--reward", "tests.recipes.test_ppo:letter_a_reward",
                 "rl.minibatch_size=16"]) == 2
    assert "rl.minibatch_size=16 is more than the 8 responses" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # refused before anything was written
    assert main(["rloo", *base, "--output", str(tmp_path / "b"), "--reward", "tests.recipes.test_grpo:short_reward"]) == 2
    assert "returned 1 scores for 8 responses" in capsys.readouterr().err
    assert main(["grpo", *base, "--output", str(tmp_path / "c"), "--reward", "tests.recipes.test_grpo:text_reward"]) == 2
    assert "returned 'good' (str) for response 0 of the batch of 8" in capsys.readouterr().err
    assert main(["grpo", *base, "--output", str(tmp_path / "d"), "--reward", "tests.recipes.test_grpo:nan_reward"]) == 2
    assert "returned nan (float) for response 1 of the batch of 8" in capsys.readouterr().err
    assert main(["grpo", *base, "--output", str(tmp_path / "e"), "rl.num_generations=1"]) == 2
    assert "rl.num_generations" in capsys.readouterr().err


def test_batch_split_over_processes_is_checked():
    from tunelab.recipes.online import check_batch_split

    check_batch_split(2, train__batch_size=4, rl__minibatch_size=None)
    with pytest.raises(TrainingError, match="rl.minibatch_size=3 cannot be shared evenly by 2 processes"):
        check_batch_split(2, train__batch_size=4, rl__minibatch_size=3)


def short_reward(prompts, responses):
    return [1.0]


def text_reward(prompts, responses):
    return ["good" for _ in responses]


def nan_reward(prompts, responses):
    return [0.0, float("nan")] + [0.0] * (len(responses) - 2)

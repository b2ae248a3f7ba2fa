"""PPO end to end: EOS/padding handling, learning a reward, staying near the reference under a large KL penalty."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers import make_tiny_model_dir, write_jsonl
from tunelab.cli import main
from tunelab.config import DataConfig, DataSource, ModelConfig, PPOConfig, TrainConfig
from tunelab.recipes.ppo import PolicyWithValueHead, run_ppo
from tunelab.rewards import RewardSourceError, load_reward_fn
from tunelab.rollout import response_mask


def letter_a_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Favours tokens with the letter 'a': the share of a response's characters that are 'a' (x10)."""
    return [10 * r.count("a") / max(1, len(r)) for r in responses]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("ppo") / "model")


def ppo_config(model, prompts, output, **overrides) -> PPOConfig:
    config = PPOConfig(model=ModelConfig(name_or_path=str(model)), output=str(output), peft="none",
                       data=DataConfig(sources=[DataSource(path=str(prompts))], eval_fraction=0.0),
                       train=TrainConfig(lr=1e-2, batch_size=16, max_steps=30, warmup_ratio=0.0, log_every=10,
                                         report=False))
    config.ppo.kl_coef = 0.1
    config.reward.source = "tests.recipes.test_ppo:letter_a_reward"
    config.generation.max_new_tokens = 8
    config.generation.min_new_tokens = 8
    config.ppo.minibatch_size = 8
    config.ppo.sample_every = 0
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(config, section), name, value)
    return config


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    rows = [{"prompt": f"Write a review of Film {i}.\n"} for i in range(64)]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)


def test_response_mask_is_positional_when_pad_equals_eos():
    eos = pad = 2
    generated = torch.tensor([[5, 6, eos, pad, pad], [7, 8, 9, 10, 11], [eos, pad, pad, pad, pad]])
    mask, ended = response_mask(generated, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_value_head_forward_places_values_on_response_tokens(tiny_dir):
    from transformers import AutoModelForCausalLM

    module = PolicyWithValueHead(AutoModelForCausalLM.from_pretrained(tiny_dir)).eval()
    ids = torch.tensor([[0, 1, 5, 6, 7, 8], [1, 5, 6, 7, 8, 9]])
    attention = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left-padded prompt
    loss_mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    logprobs, values, entropy = module(ids, attention, loss_mask)
    for tensor in (logprobs, values, entropy):
        assert tensor.shape == (2, 6) and (tensor[:, :3] == 0).all()
    assert (logprobs[:, 3:] < 0).all() and (entropy[:, 3:] > 0).all()
    # row 0 is row 1 shifted by one pad: positions come from the mask, so the shared tokens score alike
    same = module(ids[:1, 1:], attention[:1, 1:], loss_mask[:1, 1:])[0]
    assert torch.allclose(same[0, 2:], logprobs[0, 3:], atol=1e-5)


def test_ppo_raises_the_score_while_kl_stays_bounded(tiny_dir, prompts, tmp_path):
    result = run_ppo(ppo_config(tiny_dir, prompts, tmp_path / "run"), quiet=True)
    history = result.history
    assert len(history) == 30
    first = sum(h["score_mean"] for h in history[:5]) / 5
    last = sum(h["score_mean"] for h in history[-5:]) / 5
    assert last > first + 0.5, (first, last)
    assert max(h["kl"] for h in history) < 25  # the penalty holds the policy within reach of the reference
    keys = {"score_mean", "score_std", "kl", "kl_coef", "entropy", "policy_loss", "value_loss", "clip_fraction",
            "approx_kl", "explained_variance", "response_length", "eos_rate", "generate_s", "rollout_s", "learn_s"}
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert keys <= set(logged[0]) and [m["step"] for m in logged] == list(range(1, 31))
    assert all(0 < m["generate_s"] <= m["rollout_s"] for m in logged)  # sampling is part of the rollout phase
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_large_kl_coef_keeps_the_policy_near_the_reference(tiny_dir, prompts, tmp_path):
    free = run_ppo(ppo_config(tiny_dir, prompts, tmp_path / "free", ppo__kl_coef=0.0), quiet=True)
    held = run_ppo(ppo_config(tiny_dir, prompts, tmp_path / "held", ppo__kl_coef=5.0), quiet=True)
    free_kl = sum(h["kl"] for h in free.history[-5:]) / 5
    held_kl = sum(h["kl"] for h in held.history[-5:]) / 5
    assert held_kl < free_kl / 3, (held_kl, free_kl)
    assert abs(held_kl) < 0.5


def test_adaptive_kl_coef_changes_and_lora_uses_the_disabled_adapter(tiny_dir, prompts, tmp_path, capsys):
    config = ppo_config(tiny_dir, prompts, tmp_path / "run", ppo__adaptive_kl=True, ppo__kl_target=0.01,
                        ppo__kl_horizon=100, train__max_steps=6)
    config.peft = "lora"
    config.train.lr = 5e-3
    result = run_ppo(config, quiet=True)
    coefs = [h["kl_coef"] for h in result.history]
    assert coefs[0] == pytest.approx(0.1) and coefs[-1] != pytest.approx(0.1)
    assert "adapter disabled" in capsys.readouterr().err
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()


def test_reward_source_errors_are_clear(tmp_path):
    with pytest.raises(RewardSourceError, match="no reward given"):
        load_reward_fn("")
    with pytest.raises(RewardSourceError, match="could not be imported"):
        load_reward_fn("no_such_module_xyz:score")
    with pytest.raises(RewardSourceError, match="is not an existing reward-model directory"):
        load_reward_fn(str(tmp_path / "missing-rm"))
    assert load_reward_fn("tests.recipes.test_ppo:letter_a_reward")(["p"], ["aa"]) == [10.0]


def test_ppo_cli_checkpoint_and_resume(tiny_dir, prompts, tmp_path):
    out = tmp_path / "run"
    args = ["ppo", "--model", str(tiny_dir), "--data", str(prompts), "--reward",
            "tests.recipes.test_ppo:letter_a_reward", "--output", str(out), "--max-steps", "4", "--batch-size", "8",
            "--peft", "none", "--quiet", "generation.max_new_tokens=6", "train.save_every=2", "ppo.sample_every=2"]
    assert main(args) == 0
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-2", "step-4"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2, 4} and all("score" in s for s in samples)
    assert main(args[:args.index("--max-steps") + 1] + ["6"] + args[args.index("--max-steps") + 2:]
                + ["--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_separate_critic_from_a_reward_model(tiny_dir, prompts, tmp_path, capsys):
    from safetensors.torch import load_file

    from tunelab.config import RMConfig
    from tunelab.recipes.reward import run_rm

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Film {i}: ", "chosen": "aaa", "rejected": "zzz"}
                                                   for i in range(16)])
    run_rm(RMConfig(model=ModelConfig(name_or_path=str(tiny_dir)), output=str(tmp_path / "rm"), peft="none",
                    data=DataConfig(sources=[DataSource(path=str(pairs))], eval_fraction=0.0),
                    train=TrainConfig(max_steps=2, batch_size=8, report=False)), quiet=True)
    config = ppo_config(tiny_dir, prompts, tmp_path / "run", train__max_steps=3, train__save_every=3,
                        ppo__critic=str(tmp_path / "rm"))
    config.peft = "lora"
    result = run_ppo(config, quiet=True)
    assert "value: critic initialised from" in capsys.readouterr().err
    assert all(math.isfinite(h["value_loss"]) for h in result.history)
    saved = load_file(tmp_path / "run" / "checkpoints" / "step-3" / "trainable.safetensors")
    assert any(k.startswith("critic.") and "score" in k for k in saved)  # the critic's head trains in full
    assert any(k.startswith("critic.") and "lora_" in k for k in saved)  # and its body through its own adapter
    assert not any(k.startswith("value_head") for k in saved)


def test_micro_batches_give_the_same_ppo_updates(tiny_dir, tmp_path):
    """Rows split into trimmed micro-batches (train.micro_batch_tokens) reproduce the one-pass statistics."""
    rows = [{"prompt": "Write a review of " + "the long film " * (i % 5) * 3 + f"number {i}.\n"} for i in range(32)]
    prompts = write_jsonl(tmp_path / "varied.jsonl", rows)
    history = {}
    for name, budget in (("whole", None), ("split", 24)):
        # one iteration: the same rollout for both (a later one may sample differently once float
        # rounding has nudged the weights), then 4 epochs x 2 minibatches of updates on it
        config = ppo_config(tiny_dir, prompts, tmp_path / name, train__max_steps=1, train__micro_batch_tokens=budget)
        history[name] = run_ppo(config, quiet=True).history
    whole, split = history["whole"][0], history["split"][0]
    for key in ("score_mean", "kl"):  # from the experience passes, before any update: float rounding only
        assert split[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), key
    # means over the 8 updates: Adam turns rounding differences in tiny gradients into small weight
    # differences (on a GPU, whose kernels depend on the batch shape, about 3e-4 relative here)
    for key in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction"):
        assert split[key] == pytest.approx(whole[key], rel=1e-3, abs=1e-4), key
    assert whole["approx_kl"] > 0 and whole["updates"] == 8  # the policy moved within the iteration


@pytest.mark.parametrize("budget", [None, 64])
def test_first_minibatch_is_forwarded_once_with_the_same_updates(tiny_dir, tmp_path, monkeypatch, budget):
    """The experience pass's forward of the first minibatch serves as the first update's forward: 8 rows fewer
    forwarded per iteration, and the weights end where two separate forwards take them (up to float rounding).
    Where the minibatch is split into micro-batches (a token budget of 64: pieces of a few rows, shortest
    first), the piece of its longest rows is the one forwarded once, and the first update runs it first."""
    import tunelab.recipes.ppo as ppo_module
    from tests.helpers import final_weights as weights

    prompts = write_jsonl(tmp_path / "prompts.jsonl",  # prompts of several lengths
                          [{"prompt": f"Write a review of Film {i}." + " More." * (i % 4) + "\n"} for i in range(64)])

    calls = {"n": 0}
    forward = PolicyWithValueHead.forward

    def counted(self, input_ids, *args, **kwargs):
        calls["n"] += input_ids.shape[0]  # rows forwarded
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(PolicyWithValueHead, "forward", counted)
    held = []
    first_piece = ppo_module.first_piece

    def recorded(pieces):
        held.append((len(pieces), len(first_piece(pieces)[0])))
        return first_piece(pieces)

    monkeypatch.setattr(ppo_module, "first_piece", recorded)
    make_experience = ppo_module.make_experience
    counts = {}
    for name in ("reused", "separate"):
        if name == "separate":  # no first rows: every row gets a no-gradient pass, every update its own forward
            monkeypatch.setattr(ppo_module, "make_experience",
                                lambda *a, **k: make_experience(*a, **{**k, "first_rows": None}))
        calls["n"] = 0
        config = ppo_config(tiny_dir, prompts, tmp_path / name, train__max_steps=2, train__micro_batch_tokens=budget)
        run_ppo(config, quiet=True)
        counts[name] = calls["n"]
    # per iteration: 16 rows without gradients, then 4 epochs x 2 minibatches of 8 with
    assert counts["separate"] == 2 * (16 + 4 * 16)
    experience_calls = held[:2]  # make_experience's choice in each reused iteration (learn's come after)
    if budget is None:
        assert experience_calls == [(1, 8), (1, 8)]  # the whole minibatch in one piece
    else:
        assert all(pieces > 1 and 0 < rows < 8 for pieces, rows in experience_calls), experience_calls
    assert counts["reused"] == counts["separate"] - sum(rows for _, rows in experience_calls)
    one, two = weights(tmp_path / "reused"), weights(tmp_path / "separate")
    # the old log-probs come from an 8-row forward instead of a 16-row one: on several threads the matrix
    # products round differently by batch shape (about 1e-7), which Adam at lr 1e-2 turns into ~5e-6 in weights
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst < 1e-4, worst

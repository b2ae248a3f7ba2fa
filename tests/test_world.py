"""Tests for the built-in demo world (corpus, lexicon judge, tokenizer, tiny model)."""

import random
import re
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.demo.world import (
    CHATML_TEMPLATE,
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    build_tiny_model,
    build_tokenizer,
    is_positive,
    lexicon_score,
    make_review,
    make_reviews,
    make_titles,
    review_instruction,
)


@pytest.fixture(scope="module")
def reviews():
    return make_reviews(2000, seed=0)


@pytest.fixture(scope="module")
def tokenizer(reviews):
    return build_tokenizer([r["text"] for r in reviews])


# ---------------------------------------------------------------- lexicon


def test_lexicon_shape():
    assert 25 <= len(POSITIVE_WORDS) <= 45 and 25 <= len(NEGATIVE_WORDS) <= 45
    assert not POSITIVE_WORDS & NEGATIVE_WORDS
    for w in POSITIVE_WORDS | NEGATIVE_WORDS:
        assert w.isascii() and w.isalpha() and w == w.lower()
    assert {"wonderful", "superb", "brilliant"} <= POSITIVE_WORDS
    assert {"dull", "boring", "awful"} <= NEGATIVE_WORDS


@pytest.mark.parametrize(
    "text,score",
    [
        ("", 0),
        ("It runs about two hours.", 0),
        ("A wonderful, SUPERB film!", 2),
        ("Dull... boring; awful?", -3),
        ("Brilliant acting, but a tedious script.", 0),
        ("wonderfully wonderful", 2),
        ("Superb superb superb dull", 2),
        ("notdull dullness", 0),  # whole words only
    ],
)
def test_lexicon_score_hand_written(text, score):
    assert lexicon_score(text) == score
    assert is_positive(text) == (score > 0)


# ---------------------------------------------------------------- titles


def test_titles_distinct_deterministic_and_lexicon_free():
    titles = make_titles(3000, seed=5)
    assert len(titles) == len(set(titles)) == 3000
    assert titles == make_titles(3000, seed=5)
    assert titles != make_titles(3000, seed=6)
    assert all(lexicon_score(t) == 0 for t in titles)
    # Several patterns show up, not just one shape.
    assert any(" of the " in t for t in titles)
    assert any(" in " in t for t in titles)
    assert any(t.startswith("The ") and len(t.split()) == 3 for t in titles)


def test_titles_pool_is_large_and_bounded():
    assert len(make_titles(6000, seed=0)) == 6000
    with pytest.raises(ValueError):
        make_titles(10**6, seed=0)


# ---------------------------------------------------------------- reviews


def test_reviews_deterministic_and_balanced(reviews):
    assert reviews == make_reviews(2000, seed=0)
    assert reviews != make_reviews(2000, seed=1)
    assert sum(r["sentiment"] == "positive" for r in reviews) == 1000
    assert {r["sentiment"] for r in reviews} == {"positive", "negative"}
    assert set(reviews[0]) == {"title", "sentiment", "text"}
    # Shuffled, not blocked: both labels occur in the first 20 rows.
    assert len({r["sentiment"] for r in reviews[:20]}) == 2
    odd = make_reviews(7, seed=3)
    assert sum(r["sentiment"] == "positive" for r in odd) == 4


def test_review_lexicon_bounds(reviews):
    for r in reviews:
        score = lexicon_score(r["text"])
        if r["sentiment"] == "positive":
            assert score >= 2, r["text"]
        else:
            assert score <= -2, r["text"]
        assert is_positive(r["text"]) == (r["sentiment"] == "positive")
    # And directly through make_review with an independent rng.
    rng = random.Random(42)
    for i in range(2000):
        pos = i % 2 == 0
        score = lexicon_score(make_review("The Quiet Lantern", pos, rng))
        assert score >= 2 if pos else score <= -2


def test_review_format(reviews):
    negation = re.compile(r"\b(not|no|never|nor|n't|isn|wasn|didn|hardly)\b", re.I)
    lengths = []
    for r in reviews:
        text = r["text"]
        assert text.isascii() and "\n" not in text and "  " not in text
        assert not negation.search(text), text
        sentences = re.findall(r"[.!?](?:\s|$)", text)
        assert 2 <= len(sentences) <= 4, text
        lengths.append(len(text.split()))
    mean = sum(lengths) / len(lengths)
    assert 20 <= mean <= 60
    assert sum(20 <= n <= 60 for n in lengths) >= 0.6 * len(lengths)
    first_has_title = sum(r["text"].split(". ")[0].count(r["title"]) > 0 for r in reviews)
    assert first_has_title >= 0.7 * len(reviews)
    assert len({r["text"] for r in reviews}) == len(reviews)


def test_review_instruction():
    assert review_instruction("The Silent Harbor") == "Write a review of The Silent Harbor."


# ---------------------------------------------------------------- tokenizer


ODD_TEXTS = [
    "  leading spaces and trailing  ",
    "line one\nline two\n\n\tindented\n",
    "Punctuation , spaced . like ' this ' ! (and) [brackets] {braces}",
    "Zebra quixotic jukebox 0123456789 ~`@#$%^&*_+=|\\/<>",
    "<s> looks special but is raw text </s>",
]


def test_tokenizer_round_trip(tokenizer, reviews):
    for text in ODD_TEXTS + [r["text"] for r in reviews[:200]]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == 1024
    for tok in ("<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"):
        ids = tokenizer(tok, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] == tokenizer.convert_tokens_to_ids(tok)
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert len(ids) == 3 and None not in ids
    assert tokenizer.model_max_length == 512 and tokenizer.padding_side == "right"


def test_tokenizer_bos_only_with_special_tokens(tokenizer):
    with_sp = tokenizer("a review")["input_ids"]
    without = tokenizer("a review", add_special_tokens=False)["input_ids"]
    assert with_sp == [tokenizer.bos_token_id] + without
    assert tokenizer.bos_token_id not in without
    assert tokenizer.eos_token_id not in with_sp
    batch = tokenizer(["hi", "a much longer review text"], padding=True)["input_ids"]
    assert batch[0][-1] == tokenizer.pad_token_id and batch[1][0] == tokenizer.bos_token_id


def test_chat_template(tokenizer):
    msgs = [{"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    full = msgs + [{"role": "assistant", "content": "ok"}]
    assert tokenizer.apply_chat_template(full, tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
    )
    # In transformers 5 tokenize=True returns a BatchEncoding, not a list.
    enc = tokenizer.apply_chat_template(full, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert ids == tokenizer(tokenizer.apply_chat_template(full, tokenize=False), add_special_tokens=False)["input_ids"]
    assistant = [i for i, m in zip(ids, mask) if m]
    assert tokenizer.decode(assistant) == "ok<|im_end|>"


def test_tokenizer_save_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in ODD_TEXTS:
        for sp in (True, False):
            assert loaded(text, add_special_tokens=sp)["input_ids"] == tokenizer(text, add_special_tokens=sp)["input_ids"]
    assert loaded.chat_template == CHATML_TEMPLATE
    assert loaded.all_special_tokens == tokenizer.all_special_tokens
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")
    assert loaded.model_max_length == 512 and loaded.padding_side == "right"
    assert len(loaded) == len(tokenizer)
    assert loaded.decode(loaded(ODD_TEXTS[2], add_special_tokens=False)["input_ids"]) == ODD_TEXTS[2]


def test_tokenizer_training_is_fast_and_deterministic(reviews):
    texts = [r["text"] for r in reviews]
    start = time.perf_counter()
    a = build_tokenizer(texts)
    assert time.perf_counter() - start < 5
    b = build_tokenizer(texts)
    assert a.get_vocab() == b.get_vocab()
    small = build_tokenizer(texts, vocab_size=400)
    assert len(small) == 400


# ---------------------------------------------------------------- model


def test_tiny_model_config_and_determinism(tokenizer):
    state = torch.random.get_rng_state()
    model = build_tiny_model(tokenizer, seed=0)
    assert torch.equal(state, torch.random.get_rng_state())  # caller's RNG untouched
    cfg = model.config
    assert cfg.vocab_size == len(tokenizer)
    assert not cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    for obj in (cfg, model.generation_config):
        assert obj.bos_token_id == tokenizer.bos_token_id
        assert obj.eos_token_id == tokenizer.eos_token_id
        assert obj.pad_token_id == tokenizer.pad_token_id
    n_params = sum(p.numel() for p in model.parameters())
    assert 500_000 < n_params < 3_000_000
    same = build_tiny_model(tokenizer, seed=0).state_dict()
    other = build_tiny_model(tokenizer, seed=1).state_dict()
    sd = model.state_dict()
    assert all(torch.equal(sd[k], same[k]) for k in sd)
    assert not all(torch.equal(sd[k], other[k]) for k in sd)
    bigger = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
    assert bigger.config.num_hidden_layers == 2 and bigger.config.hidden_size == 64


def test_tiny_model_save_load_same_logits(tokenizer, tmp_path):
    model = build_tiny_model(tokenizer, seed=3).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    batch = tokenizer(["I loved it.", "The Silent Harbor is dull and tedious."], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = model(**batch).logits
        b = loaded(**batch).logits
    assert a.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.equal(a, b)
    assert loaded.generation_config.pad_token_id == tokenizer.pad_token_id


def test_neutral_reviews_carry_no_opinion():
    from tunelab.demo.world import make_neutral_review

    rng = random.Random(11)
    reviews = [make_neutral_review("The Glass Fox", rng) for _ in range(500)]
    assert all(lexicon_score(r) == 0 for r in reviews)
    assert all(r.startswith("I watched The Glass Fox.") for r in reviews)
    assert len(set(reviews)) > 100

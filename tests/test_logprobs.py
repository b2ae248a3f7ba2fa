"""Selective-head log-probs equal the plain full-logits computation, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from tunelab.logprobs import LogprobModel, token_logprobs
from tunelab.demo import world


@pytest.fixture(scope="module")
def model_and_batch():
    tokenizer = world.build_tokenizer([r["text"] for r in world.make_reviews(200, 0)], vocab_size=300)
    model = world.build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    input_ids = torch.randint(5, len(tokenizer), (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # right padding
    attention_mask[2, 6:] = 0
    loss_mask = attention_mask.clone()
    loss_mask[:, :4] = 0  # a 4-token "prompt"
    return model, input_ids, attention_mask, loss_mask


def reference_logprobs(model, input_ids, attention_mask, loss_mask, position_ids=None):
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits.float()
    lp = torch.gather(F.log_softmax(logits[:, :-1], -1), 2, input_ids[:, 1:, None]).squeeze(2)
    return F.pad(lp, (1, 0)) * loss_mask


@pytest.mark.parametrize("chunk_size", [1, 5, 2048])
def test_selective_head_matches_full_logits(model_and_batch, chunk_size):
    model, ids, attn, mask = model_and_batch
    model.eval()
    expected = reference_logprobs(model, ids, attn, mask)
    got = token_logprobs(model, ids, attn, mask, chunk_size=chunk_size)
    assert got.shape == ids.shape
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got[mask == 0] == 0).all()
    assert (got[mask == 1] < 0).all()


def test_chunked_recompute_gives_the_same_gradients(model_and_batch):
    model, ids, attn, mask = model_and_batch
    model.eval()
    model.zero_grad()
    reference_logprobs(model, ids, attn, mask).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    LogprobModel(model, chunk_size=3)(ids, attn, mask).sum().backward()  # several chunks: recomputed head
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, expected[name], atol=1e-5), name


def assert_like_full_logits(model, ids, attn, mask, position_ids=None):
    """`LogprobModel`'s log-probs and gradients equal those of the plain full-logits computation; returns them."""
    model.zero_grad()
    expected = reference_logprobs(model, ids, attn, mask, position_ids)
    expected.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = LogprobModel(model)(ids, attn, mask)
    got.sum().backward()
    assert torch.allclose(got, expected, atol=1e-5)
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, grads[name], atol=1e-5), name
    return got


def test_rows_of_very_different_lengths_run_in_buckets_with_the_same_results(model_and_batch):
    from tunelab.logprobs import length_buckets, real_spans

    model = model_and_batch[0].eval()
    torch.manual_seed(1)
    lengths = [8, 10, 110, 9, 115, 12]
    ids = torch.randint(5, 300, (6, 120))
    attn = (torch.arange(120) < torch.tensor(lengths)[:, None]).long()
    mask = attn.clone()
    mask[:, :4] = 0
    buckets = length_buckets(attn)
    assert [(rows.tolist(), length) for rows, length in buckets] == [([0, 3, 1, 5], 12), ([2, 4], 115)]
    assert len(length_buckets(torch.ones(3, 20, dtype=torch.long))) == 1  # equal lengths: one pass
    holed = attn.clone()
    holed[2, 50] = 0  # a row whose real tokens are not one run of columns
    assert real_spans(holed) is None
    assert len(length_buckets(holed)) == 1
    assert_like_full_logits(model, ids, attn, mask)


def test_rollout_rows_padded_on_both_sides_run_in_buckets_with_the_same_results(model_and_batch):
    # sampled rows: left padding before the prompt, right padding after a response that ended early
    from tunelab.logprobs import length_buckets, position_ids_from_mask, real_spans

    model = model_and_batch[0].eval()
    torch.manual_seed(2)
    width = 130
    spans = [(110, 12), (0, 125), (100, 20), (5, 118), (108, 9), (3, 90)]  # (first real column, real tokens)
    ids = torch.randint(5, 300, (len(spans), width))
    columns = torch.arange(width)
    attn = torch.stack([((columns >= a) & (columns < a + n)).long() for a, n in spans])
    mask = attn.clone()
    for row, (a, n) in enumerate(spans):
        mask[row, a:a + n // 3] = 0  # the prompt's tokens are not scored
    starts, lengths = real_spans(attn)
    assert starts.tolist() == [a for a, _ in spans] and lengths.tolist() == [n for _, n in spans]
    buckets = length_buckets(attn)
    assert [(rows.tolist(), length) for rows, length in buckets] == [([4, 0, 2], 20), ([5, 3, 1], 125)]
    got = assert_like_full_logits(model, ids, attn, mask, position_ids=position_ids_from_mask(attn))
    assert (got[mask == 0] == 0).all()

"""Per-token log-probabilities on the positions that matter.

A causal LM's head is its most expensive layer on small models (hidden x vocab per position), and its
output, `[B, T, vocab]` logits in fp32, is usually the largest tensor of a training step. Here the
trunk runs once, the hidden states of the positions whose next token is scored are gathered, and the
head runs on those rows only, in chunks; under autograd each chunk is recomputed in the backward
pass instead of being stored, so at most `chunk_size x vocab` logits exist at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def is_encoder_decoder(model: nn.Module) -> bool:
    """True for an encoder-decoder (T5, BART), also through a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(getattr(base, "config", None), "is_encoder_decoder", False))


class DecoderHead(nn.Module):
    """The LM head of an encoder-decoder as its own forward applies it: T5's rescaling of the decoder output
    (`scale_decoder_outputs`, where the head is tied to the embeddings) and BART's `final_logits_bias`."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.head = base.get_output_embeddings()
        config = base.config
        scaled = getattr(config, "scale_decoder_outputs", None)
        if scaled is None:  # older T5 configs say it through the tied embeddings alone
            scaled = config.model_type in ("t5", "mt5", "umt5") and getattr(config, "tie_word_embeddings", False)
        self.scale = getattr(config, "d_model", 1) ** -0.5 if scaled else None
        self.bias = getattr(base, "final_logits_bias", None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden * self.scale if self.scale is not None else hidden)
        return logits + self.bias.to(logits.dtype) if self.bias is not None else logits


def trunk_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer body and the LM head of a language model, through a PEFT wrapper if there is one.

    LoRA layers are injected into the body's modules in place, so calling the body keeps them active. For an
    encoder-decoder the body is the whole base model (encoder and decoder) and the head applies what its
    forward adds to the decoder's output (see `DecoderHead`).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "is_encoder_decoder", False):
        return base, DecoderHead(base)
    return base.get_decoder(), base.get_output_embeddings()


def _chunk_logprobs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return torch.gather(F.log_softmax(logits, dim=-1), 1, targets.unsqueeze(1)).squeeze(1)


def _chunk_logprobs_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logprobs = F.log_softmax(head(hidden).float(), dim=-1)
    picked = torch.gather(logprobs, 1, targets.unsqueeze(1)).squeeze(1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return torch.stack([picked, entropy], dim=1)


def head_logprobs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                  chunk_size: int = 2048, with_entropy: bool = False) -> torch.Tensor:
    """log p(target | hidden) for gathered rows: `hidden [N, H]`, `targets [N]` -> `[N]` fp32.

    With `with_entropy`, returns `[N, 2]`: the log-prob and the entropy of the next-token distribution.
    """
    fn = _chunk_logprobs_entropy if with_entropy else _chunk_logprobs
    if hidden.shape[0] == 0:
        # still through the head: a data-parallel backward expects every trained parameter to take part
        return fn(head, hidden, targets)
    recompute = torch.is_grad_enabled() and hidden.requires_grad and hidden.shape[0] > chunk_size
    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        parts.append(checkpoint(fn, head, h, t, use_reentrant=False) if recompute else fn(head, h, t))
    return torch.cat(parts)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: left padding then gives the same positions as none."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


BUCKET_OVERHEAD_TOKENS = 64  # a forward pass costs about this many padded tokens' work by itself


def real_spans(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each row's first real column and its count of real tokens `([B], [B])`, when every row's real tokens are one
    run of columns (left padding, right padding or both, as a sampled rollout has); None otherwise."""
    real = attention_mask.bool()
    lengths = real.sum(1)
    starts = torch.where(lengths > 0, real.int().argmax(1), torch.zeros_like(lengths))
    columns = torch.arange(real.shape[1], device=real.device)
    expected = (columns >= starts[:, None]) & (columns < (starts + lengths)[:, None])
    return (starts, lengths) if bool((real == expected).all()) else None


def length_buckets(attention_mask: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """Split a padded batch into groups of rows that pad less when run apart: [(rows, length)].

    Rows sorted by their count of real tokens are cut where the padded tokens saved outweigh the cost of
    another forward pass (an exact dynamic program over the cut points). One bucket (the whole batch) when
    cutting does not pay, or when some row's real tokens are not one run of columns (`real_spans`).
    """
    spans = real_spans(attention_mask)
    n = attention_mask.shape[0]
    if n < 2 or spans is None:
        return [(torch.arange(n, device=attention_mask.device), attention_mask.shape[1])]
    lengths = spans[1]
    order = torch.argsort(lengths, stable=True)
    sorted_lengths = lengths[order].tolist()
    # best[j]: least cost of the first j sorted rows; a bucket of rows i..j-1 costs (j - i) * len[j - 1]
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (j - i) * sorted_lengths[j - 1] + BUCKET_OVERHEAD_TOKENS
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], n
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    if len(bounds) == 1:
        return [(torch.arange(n, device=attention_mask.device), attention_mask.shape[1])]
    return [(order[i:j], max(int(sorted_lengths[j - 1]), 1)) for i, j in reversed(bounds)]


def bucketed_trunk(trunk: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   buckets: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """The trunk's final hidden states `[B, T, H]` with each bucket's rows run apart, their real tokens moved to the
    left of a tensor of the bucket's length (positions are counted over real tokens, so each real token's state is
    the one the whole batch gives it); padding columns are zero."""
    starts, lengths = real_spans(attention_mask)
    parts, places = [], []
    for rows, length in buckets:
        offsets = torch.arange(length, device=input_ids.device)
        columns = (starts[rows, None] + offsets).clamp(max=input_ids.shape[1] - 1)
        mask = (offsets < lengths[rows, None]).long()
        hidden = trunk(input_ids=torch.gather(input_ids[rows], 1, columns), attention_mask=mask,
                       position_ids=position_ids_from_mask(mask), use_cache=False).last_hidden_state
        real = mask.bool()
        parts.append(hidden[real])
        places.append((rows[:, None].expand_as(columns)[real], columns[real]))
    out = parts[0].new_zeros((*input_ids.shape, parts[0].shape[-1]))
    rows = torch.cat([r for r, _ in places])
    columns = torch.cat([c for _, c in places])
    return out.index_put((rows, columns), torch.cat(parts))


def split_for_encoder_decoder(input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
                              ) -> dict[str, torch.Tensor]:
    """Lay a `[B, T]` batch of `[source | target]` rows out for an encoder-decoder.

    In every row the real tokens before its first scored one are the encoder's input, and the real tokens from
    it on are the decoder's targets, each side moved to the left of its own right-padded tensor (so prompts
    left-padded for sampling and rows right-padded for training give the same layout). Returns
    `encoder_ids`, `encoder_mask` `[B, S]`, `targets`, `target_mask` `[B, D]` (ids 0 on padding) and
    `target_columns` `[B, D]`, the column of each target in the input batch.
    """
    real = attention_mask.bool()
    in_target = (loss_mask.long().cumsum(1) > 0) & real
    in_source = real & ~in_target

    def packed(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        counts = keep.sum(1)
        width = max(int(counts.max()) if counts.numel() else 0, 1)
        columns = torch.sort((~keep).int(), dim=1, stable=True).indices[:, :width]  # kept columns first, in order
        mask = torch.arange(width, device=keep.device)[None, :] < counts[:, None]
        return torch.gather(input_ids, 1, columns).masked_fill(~mask, 0), mask.long(), columns

    encoder_ids, encoder_mask, _ = packed(in_source)
    targets, target_mask, target_columns = packed(in_target)
    return {"encoder_ids": encoder_ids, "encoder_mask": encoder_mask, "targets": targets,
            "target_mask": target_mask, "target_columns": target_columns}


def decoder_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          loss_mask: torch.Tensor) -> torch.Tensor:
    """The decoder's final hidden states of an encoder-decoder, laid out as a causal LM's: `[B, T, H]` whose
    row b, column t - 1 is the state that predicts `input_ids[b, t]`, for every target token t (zero elsewhere).

    The source (the tokens before a row's first scored one) goes to the encoder; the decoder reads its start
    token and the targets shifted right (teacher forcing), as `generate` produced them. A soft prompt (PEFT
    prompt tuning) is prepended to the encoder's input, as peft's own seq2seq forward does.
    """
    from tunelab.modeling import is_prompt_learning

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layout = split_for_encoder_decoder(input_ids, attention_mask, loss_mask)
    encoder_ids, encoder_mask = layout["encoder_ids"], layout["encoder_mask"]
    encoder_input = {"input_ids": encoder_ids}
    if is_prompt_learning(model):
        embeddings = base.get_input_embeddings()(encoder_ids)
        prompt = model.get_prompt(batch_size=encoder_ids.shape[0]).to(embeddings.dtype)
        encoder_input = {"inputs_embeds": torch.cat([prompt, embeddings], dim=1)}
        encoder_mask = torch.cat([encoder_mask.new_ones(encoder_ids.shape[0], prompt.shape[1]), encoder_mask], 1)
    encoded = base.get_encoder()(**encoder_input, attention_mask=encoder_mask).last_hidden_state
    targets, target_mask = layout["targets"], layout["target_mask"]
    start = base.config.decoder_start_token_id
    if start is None:
        start = base.config.pad_token_id
    decoder_ids = torch.cat([targets.new_full((targets.shape[0], 1), start), targets[:, :-1]], 1)
    decoded = base.get_decoder()(input_ids=decoder_ids, attention_mask=target_mask, encoder_hidden_states=encoded,
                                 encoder_attention_mask=encoder_mask, use_cache=False).last_hidden_state
    rows, positions = target_mask.bool().nonzero(as_tuple=True)
    columns = (layout["target_columns"][rows, positions] - 1).clamp(min=0)
    out = decoded.new_zeros((*input_ids.shape, decoded.shape[-1]))
    return out.index_put((rows, columns), decoded[rows, positions])


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states `[B, T, H]` of the transformer body, positions counted over real tokens.

    With a soft prompt (PEFT prompt tuning) its virtual tokens are prepended, as the PEFT model's own
    forward and generate do, and their positions are cut from the result. An encoder-decoder needs
    `loss_mask` (where each row's target starts) and gives its decoder's states (`decoder_hidden_states`).
    """
    from tunelab.modeling import is_prompt_learning

    from tunelab.distributed import in_lockstep

    if loss_mask is not None and is_encoder_decoder(model):
        return decoder_hidden_states(model, input_ids, attention_mask, loss_mask)
    trunk, _ = trunk_and_head(model)
    if not is_prompt_learning(model):
        # a sharded trunk runs once per call on every process, whatever its rows' lengths
        buckets = length_buckets(attention_mask) if not in_lockstep(trunk) else []
        if len(buckets) > 1:  # rows of very different lengths: run each bucket at its own length
            return bucketed_trunk(trunk, input_ids, attention_mask, buckets)
        return trunk(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    embeddings = model.get_base_model().get_input_embeddings()(input_ids)
    prompt = model.get_prompt(batch_size=input_ids.shape[0]).to(embeddings.dtype)
    virtual = prompt.shape[1]
    mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], virtual), attention_mask], dim=1)
    hidden = trunk(inputs_embeds=torch.cat([prompt, embeddings], dim=1), attention_mask=mask,
                   position_ids=position_ids_from_mask(mask), use_cache=False).last_hidden_state
    return hidden[:, virtual:]


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   loss_mask: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """Log-probability of each scored token under `model`.

    Args: `input_ids`, `attention_mask`, `loss_mask`: `[B, T]`; `loss_mask[b, t] = 1` scores
    `input_ids[b, t]` given `input_ids[b, :t]` (right padding). For an encoder-decoder the tokens before a
    row's first scored one are the encoder's input and the rest its decoder's (`split_for_encoder_decoder`).
    Returns `[B, T]` fp32 log-probs, 0 where `loss_mask` is 0.
    """
    _, head = trunk_and_head(model)
    hidden = hidden_states(model, input_ids, attention_mask, loss_mask)
    scored = loss_mask[:, 1:].bool()
    picked = head_logprobs(head, hidden[:, :-1][scored], input_ids[:, 1:][scored], chunk_size)
    shifted = torch.zeros(scored.shape, dtype=torch.float32, device=hidden.device).masked_scatter(scored, picked)
    return F.pad(shifted, (1, 0))


class LogprobModel(nn.Module):
    """Wraps a language model (causal or encoder-decoder) so that its forward returns `token_logprobs`.

    Training goes through this module's forward so that `accelerate`'s DDP/FSDP wrappers see the
    whole computation (calling submodules of a DDP model directly would skip gradient sync).
    """

    def __init__(self, model: nn.Module, chunk_size: int = 2048):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    # FSDP's transformer auto-wrap reads the block classes to shard from the model it is given
    _no_split_modules = property(lambda self: getattr(self.model, "_no_split_modules", None))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None, **packed: torch.Tensor) -> torch.Tensor:
        """`token_logprobs` `[B, T]` of padded rows; given the tensors of packed pairs instead
        (`tunelab.shared_prefix.pack_pairs` with masks), each side's summed log-probs `[2N]`."""
        if packed:
            from tunelab.shared_prefix import packed_pair_logprobs

            return packed_pair_logprobs(self.model, {"input_ids": input_ids, **packed}, self.chunk_size)
        return token_logprobs(self.model, input_ids, attention_mask, loss_mask, self.chunk_size)

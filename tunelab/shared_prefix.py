"""Both sides of a preference pair in one row, their common prefix (the prompt) computed once.

A pair's chosen and rejected sequences usually share their first tokens: the prompt and the chat template's
opening of the reply. Scored as two padded rows, those tokens go through the model twice. Here one row holds
the prefix, then the chosen continuation, then the rejected one:

    ids        p0 p1 p2 | c0 c1 c2 | r0 r1
    positions   0  1  2 |  3  4  5 |  3  4
    segment     0  0  0 |  1  1  1 |  2  2

with a 4D attention mask that lets every token see the prefix and the earlier tokens of its own segment, so
the rejected tokens never see the chosen ones. Each side's hidden states are then exactly those of its own
row run alone (positions and visible tokens are the same), for less work: the prefix's tokens once, and no
padding of the shorter side to the longer.

Only for causal LMs whose attention takes a custom 4D mask (transformers' `sdpa` and `eager`), whose positions
come from `position_ids` (not ALiBi), with no sliding-window layers (the custom mask would replace their
window), and not with a soft prompt (PEFT prompt tuning prepends virtual tokens the layout does not know of);
elsewhere recipes use two rows per pair.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

PAD_SEGMENT = 3  # padding at a row's end: sees the prefix and earlier padding, and is seen by nothing real
MASKABLE_ATTENTION = ("sdpa", "eager")


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the shared start of two token sequences, leaving each side at least its last token (whose
    state a reward model reads, and which a one-sided prefix would otherwise swallow)."""
    limit = min(len(a), len(b)) - 1
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return max(n, 0)


def packed_length(a: list[int], b: list[int]) -> int:
    """Tokens of the pair's packed row: the prefix once, then both continuations."""
    return len(a) + len(b) - common_prefix(a, b)


def pack_pairs(pairs: list[tuple[list[int], list[int]]], pad_id: int,
               masks: list[tuple[list[int], list[int]]] | None = None) -> dict[str, torch.Tensor]:
    """Lay out (chosen, rejected) token sequences one pair per row, right-padded.

    Returns `input_ids`, `position_ids`, `segments` `[N, T]` (the prefix is segment 0), and the row's column of
    each side's last token, `chosen_end` and `rejected_end` `[N]`. With `masks` (each side's loss mask, as the
    sequences), also `chosen_mask` and `rejected_mask` `[N, T]`: a side's mask laid on the columns that hold
    its tokens (a prefix column belongs to both sides), and `parent` `[N, T]`, the column whose state predicts
    each column's token (-1 for a row's first token).
    """
    width = max(packed_length(a, b) for a, b in pairs)
    n = len(pairs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    segments = torch.full((n, width), PAD_SEGMENT, dtype=torch.long)
    chosen_end, rejected_end = (torch.zeros(n, dtype=torch.long) for _ in range(2))
    if masks is not None:
        chosen_mask, rejected_mask = (torch.zeros((n, width), dtype=torch.long) for _ in range(2))
        parent = torch.full((n, width), -1, dtype=torch.long)
    for row, (a, b) in enumerate(pairs):
        p = common_prefix(a, b)
        ids = a + b[p:]
        end = len(ids)
        input_ids[row, :end] = torch.tensor(ids, dtype=torch.long)
        position_ids[row, :len(a)] = torch.arange(len(a))
        position_ids[row, len(a):end] = torch.arange(p, len(b))
        segments[row, :p] = 0
        segments[row, p:len(a)] = 1
        segments[row, len(a):end] = 2
        chosen_end[row], rejected_end[row] = len(a) - 1, end - 1
        if masks is not None:
            mask_a, mask_b = masks[row]
            chosen_mask[row, :len(a)] = torch.tensor(mask_a, dtype=torch.long)
            rejected_mask[row, :p] = torch.tensor(mask_b[:p], dtype=torch.long)
            rejected_mask[row, len(a):end] = torch.tensor(mask_b[p:], dtype=torch.long)
            parent[row, 1:end] = torch.arange(end - 1)
            parent[row, len(a)] = p - 1  # the rejected side's first own token follows the prefix
    batch = {"input_ids": input_ids, "position_ids": position_ids, "segments": segments, "chosen_end": chosen_end,
             "rejected_end": rejected_end}
    if masks is not None:
        batch.update(chosen_mask=chosen_mask, rejected_mask=rejected_mask, parent=parent)
    return batch


def attention_implementation(model: nn.Module) -> str | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "_attn_implementation", None)


def unshared_reason(model: nn.Module) -> str | None:
    """Why `model` cannot run packed pairs, or None when it can: it must be a causal LM (no encoder-decoder, no
    encoder-only classifier) without a soft prompt, whose attention takes a custom 4D mask, whose positions come
    from `position_ids`, with no sliding-window layers."""
    from tunelab.logprobs import is_encoder_decoder
    from tunelab.modeling import is_prompt_learning

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or is_encoder_decoder(model):
        return "an encoder-decoder"
    if is_prompt_learning(model):
        return "a soft prompt, whose virtual tokens the layout does not hold"
    if not _is_causal_lm(base):
        return "an encoder"
    implementation = attention_implementation(model)
    if implementation not in MASKABLE_ATTENTION:
        return f"{implementation} attention, which takes no custom mask"
    if not _positions_from_ids(base):
        return "positions not taken from position_ids (ALiBi)"
    if _sliding_window(config):
        return "sliding-window attention layers"
    return None


def shared_prefix_in_force(wanted: bool, setting: str, *models: nn.Module | None) -> bool:
    """Whether a recipe runs packed pairs: `wanted` (its `setting`, e.g. `reward.share_prefix`) and every model
    that reads the pairs can; when one cannot, the log says why."""
    if not wanted:
        return False
    for model in models:
        reason = unshared_reason(model) if model is not None else None
        if reason is not None:
            from tunelab.distributed import log

            log(f"{setting} does not apply to this model ({reason}); each side of a pair gets its own row")
            return False
    return True


def _positions_from_ids(base: nn.Module) -> bool:
    # the layout restarts positions where the sides part: the body must take them as position_ids, and must not
    # derive positions of its own from the columns (ALiBi biases)
    from tunelab.logprobs import trunk_and_head

    trunk, _ = trunk_and_head(base)
    takes_positions = "position_ids" in inspect.signature(trunk.forward).parameters
    return takes_positions and not getattr(base.config, "alibi", False)


def _sliding_window(config) -> bool:
    # a custom mask replaces the sliding-window mask such layers build: rows past the window would see too much
    if any("sliding" in str(kind) for kind in getattr(config, "layer_types", None) or []):
        return True
    return bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True)


def _is_causal_lm(base: nn.Module) -> bool:
    # decoder-only families: a sequence classifier on one has a `score` head; a causal LM has a decoder
    if getattr(base, "score", None) is not None:
        return True
    try:
        return base.get_decoder() is not None and base.get_output_embeddings() is not None
    except (AttributeError, NotImplementedError):
        return False


def shared_prefix_mask(segments: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The packed rows' attention mask `[N, 1, T, T]`: causal, and a query sees a key of the prefix or of its
    own segment. Boolean (True: attend) for `sdpa`; additive (0 or the dtype's minimum) for `eager`."""
    width = segments.shape[1]
    positions = torch.arange(width, device=segments.device)
    causal = positions[None, :] <= positions[:, None]  # [query, key]
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = (causal[None] & ((key == 0) | (key == query)))[:, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(~allowed,
                                                                                      torch.finfo(dtype).min)


def packed_hidden_states(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                         segments: torch.Tensor) -> torch.Tensor:
    """Final hidden states `[N, T, H]` of the transformer body over packed pairs (see `pack_pairs`)."""
    from tunelab.logprobs import trunk_and_head

    trunk, _ = trunk_and_head(model)
    dtype = next(trunk.parameters()).dtype
    if torch.is_autocast_enabled(input_ids.device.type):
        dtype = torch.get_autocast_dtype(input_ids.device.type)
    mask = shared_prefix_mask(segments, attention_implementation(model), dtype)
    return trunk(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                 use_cache=False).last_hidden_state


def packed_pair_logprobs(model: nn.Module, batch: dict, chunk_size: int = 2048) -> torch.Tensor:
    """Summed log-probs of each side's scored tokens over packed pairs (`pack_pairs` with masks): `[2N]` fp32,
    the chosen sides then the rejected ones, equal to `token_logprobs(...).sum(-1)` on one row per side."""
    from tunelab.logprobs import head_logprobs, trunk_and_head

    _, head = trunk_and_head(model)
    hidden = packed_hidden_states(model, batch["input_ids"], batch["position_ids"], batch["segments"])
    chosen, rejected = batch["chosen_mask"].bool(), batch["rejected_mask"].bool()
    scored = (chosen | rejected) & (batch["parent"] >= 0)
    rows, columns = scored.nonzero(as_tuple=True)
    picked = head_logprobs(head, hidden[rows, batch["parent"][rows, columns]], batch["input_ids"][rows, columns],
                           chunk_size)
    logprobs = torch.zeros(scored.shape, dtype=torch.float32, device=hidden.device).index_put((rows, columns), picked)
    return torch.cat([(logprobs * chosen).sum(-1), (logprobs * rejected).sum(-1)])

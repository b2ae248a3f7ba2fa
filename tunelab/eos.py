"""The tokens a generation stops at: the tokenizer's EOS and the end-of-turn token of its chat template.

A chat template closes every assistant turn with a token of its own (`<|im_end|>` in ChatML, `<|eot_id|>`
in Llama 3, `<end_of_turn>` in Gemma), and a model trained on that template learns to emit it where the
reply ends, not the tokenizer's EOS. tunelab's own generation stops at either, and every saved model
carries the same list as `generation_config.eos_token_id`, so plain `transformers` `generate` stops there
too.
"""

from __future__ import annotations

PROBE = "TUNELAB-END-OF-TURN-PROBE"


def end_of_turn_id(tokenizer, template: str | None = None) -> int | None:
    """The special token the chat template writes right after an assistant turn's text, or None.

    Found by rendering a one-turn conversation whose reply is a probe string and reading the first special
    token after it; a template that writes no special token there (or cannot render the probe) gives None.
    """
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE}]
    try:
        text = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False)
    except Exception:  # a template with rules of its own (roles, a system turn first): no probe possible
        return None
    if not isinstance(text, str) or PROBE not in text:
        return None
    special = set(tokenizer.all_special_ids)
    special |= {i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
    after = tokenizer(text.split(PROBE, 1)[1], add_special_tokens=False)["input_ids"]
    return next((i for i in after if i in special), None)


def stop_token_ids(tokenizer, template: str | None = None) -> list[int]:
    """The token ids a reply ends at: EOS first, then the chat template's end-of-turn token (when another)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    turn = end_of_turn_id(tokenizer, template)
    return ids + [turn] if turn is not None and turn not in ids else ids


def generation_eos(tokenizer) -> int | list[int] | None:
    """`generation_config.eos_token_id` for a saved model: one id, or the list of `stop_token_ids`."""
    ids = stop_token_ids(tokenizer)
    return None if not ids else ids[0] if len(ids) == 1 else ids

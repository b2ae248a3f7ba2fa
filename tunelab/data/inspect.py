"""Show what a model will be trained on: rendered rows with the trained tokens marked, and statistics.

Masking bugs (loss on the prompt, on padding, or on nothing) are the most common fine-tuning failure;
this makes them visible before any compute is spent.
"""

from __future__ import annotations

import math

from tunelab.data.dataset import TokenizedData
from tunelab.data.templates import Rendered
from tunelab.safety import terminal_safe

GREEN, RESET = "\033[42;30m", "\033[0m"


def highlight(rendered: Rendered, tokenizer, color: bool) -> str:
    """Decode a row, marking trained spans with a green background or with `[[...]]`."""
    out, start = [], 0
    ids, mask = rendered.ids, rendered.mask
    for end in range(1, len(ids) + 1):
        if end == len(ids) or mask[end] != mask[start]:
            text = terminal_safe(tokenizer.decode(ids[start:end], skip_special_tokens=False))  # data: no escapes
            if mask[start]:
                text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
            out.append(text)
            start = end
    return "".join(out)


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return 0
    rank = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


def data_stats(data: TokenizedData) -> dict[str, float]:
    """Row counts, token-length percentiles and the share of tokens that carry loss."""
    rows = data.train + data.held_out
    lengths = sorted(len(r.ids) for r in rows)
    tokens = sum(lengths)
    trained = sum(r.trained_tokens for r in rows)
    return {
        "rows": sum(s.rows for s in data.sources),
        "kept": len(rows),
        "truncated": sum(s.truncated for s in data.sources),
        "dropped": sum(s.dropped_long + s.dropped_empty for s in data.sources),
        "tokens": tokens,
        "trained_tokens": trained,
        "trained_fraction": trained / tokens if tokens else 0.0,
        "length_p50": percentile(lengths, 50),
        "length_p90": percentile(lengths, 90),
        "length_p99": percentile(lengths, 99),
        "length_max": lengths[-1] if lengths else 0,
    }


def encoder_decoder_view(rendered: Rendered, tokenizer, color: bool) -> str:
    """A row as an encoder-decoder trains on it: the encoder's input (the tokens before the first trained one)
    and the decoder's tokens, trained spans marked."""
    first = next((t for t, m in enumerate(rendered.mask) if m), len(rendered.ids))
    source = terminal_safe(tokenizer.decode(rendered.ids[:first], skip_special_tokens=False))
    target = Rendered(rendered.ids[first:], rendered.mask[first:], rendered.where)
    return f"encoder input ({first} tokens): {source}\ndecoder ({len(target.ids)} tokens): " + \
        (highlight(target, tokenizer, color) if target.ids else "")


def inspect_report(data: TokenizedData, tokenizer, n: int = 3, color: bool = False,
                   encoder_decoder: bool = False) -> str:
    """A printable report: per-source summary, statistics and the first `n` rendered rows (for an
    `encoder_decoder` model, each row's encoder input and decoder tokens apart)."""
    stats = data_stats(data)
    lines = []
    for source in data.sources:  # each source's counts, how it was read, and what its reading left out
        lines.append(f"source {source.line()}")
        lines.extend(f"  {text}" for text in [source.reading] + [f"warning: {w}" for w in source.warnings] if text)
    lines.append(f"rows: {stats['rows']} read, {stats['kept']} kept, {stats['truncated']} truncated, "
                 f"{stats['dropped']} dropped")
    lines.append(f"tokens per row: p50 {stats['length_p50']}, p90 {stats['length_p90']}, "
                 f"p99 {stats['length_p99']}, max {stats['length_max']}")
    lines.append(f"trained tokens: {stats['trained_tokens']:,} of {stats['tokens']:,} "
                 f"({100 * stats['trained_fraction']:.1f}%)")
    marker = "green background" if color else "[[...]]"
    for rendered in (data.train + data.held_out)[:n]:
        where = terminal_safe(rendered.where)
        lines.append(f"\n--- {where} ({len(rendered.ids)} tokens, {rendered.trained_tokens} trained, "
                     f"marked with {marker}) ---")
        lines.append(encoder_decoder_view(rendered, tokenizer, color) if encoder_decoder
                     else highlight(rendered, tokenizer, color))
    return "\n".join(lines)

"""`tunelab score`: add a reward-model score to every row of a file."""

from __future__ import annotations

import json

from tunelab.checkpoint import write_output
from tunelab.data.formats import Row, text_or_messages
from tunelab.data.load import DataError, load_rows
from tunelab.rewards import RewardScorer


def _prompt_and_response(row: Row):
    """(prompt, response) of a row: prompt + response/completion, a messages conversation, or text."""
    values = row.values
    if "messages" in values:
        return None, text_or_messages(row, "messages")
    for key in ("response", "completion"):
        if key in values:
            prompt = text_or_messages(row, "prompt", optional=True) if "prompt" in values else None
            return prompt, text_or_messages(row, key)
    if "text" in values:
        return None, text_or_messages(row, "text")
    raise DataError(f"{row.where}: nothing to score; expected 'prompt' + 'response' (or 'completion'), "
                    f"'messages' or 'text', found {sorted(values)}")


def score_file(model: str, data: str, output: str | None = None, batch_size: int = 16) -> int:
    """Score every row of `data` with reward model `model`; write JSONL rows with `reward` added.

    All rows are validated before any scoring, and the output file appears only when complete.
    Returns the number of rows scored.
    """
    scored = score_rows(model, load_rows(data), batch_size)
    write_output("".join(json.dumps(row) + "\n" for row in scored), output)
    return len(scored)


def score_rows(model: str, rows: list[Row], batch_size: int = 16) -> list[dict]:
    """Each row's values with `reward` added (the reward model's score), in order; every row is checked before
    the model loads."""
    pairs = [_prompt_and_response(row) for row in rows]
    scorer = RewardScorer(model, batch_size=batch_size)
    rewards = scorer.score([p for p, _ in pairs], [r for _, r in pairs])
    return [{**row.values, "reward": reward} for row, reward in zip(rows, rewards)]

"""The GRPO workload's reward: one programmatic function that both tools import.

    tunelab grpo --reward grpo_reward:reward ...          (benchmarks/ on sys.path)
    GRPOTrainer(reward_funcs=grpo_reward.reward, ...)

The score of a response is the share of its whitespace-separated words that fall in a fixed half of all
possible words (those whose CRC-32 is even), in [0, 1]; an empty response scores 0. It needs no model,
costs microseconds, is the same for any tokenizer (the random world's `w123` words and English alike), and
varies between the K responses to one prompt, so GRPO's group advantages are not all zero.

The call signature fits both tools: tunelab calls `reward(prompts, responses)`, TRL's GRPOTrainer calls
`reward(prompts=..., completions=..., completion_ids=..., **columns)`. `SCORED` counts the responses scored
in this process, so the benchmark worker can check that both tools scored the same number.
"""

from __future__ import annotations

import zlib

SCORED = [0]


def word_score(text: str) -> float:
    words = text.split()
    if not words:
        return 0.0
    return sum(1 for w in words if zlib.crc32(w.encode()) % 2 == 0) / len(words)


def reward(prompts: list, completions: list, **_) -> list[float]:
    """One score per (prompt, completion); prompts are unused (the score reads the response alone)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    SCORED[0] += len(completions)
    return [word_score(c if isinstance(c, str) else " ".join(m["content"] for m in c)) for c in completions]

"""Evaluation metrics: BLEU, ROUGE, perplexity, reward score, pairwise win rate, KL to a reference.

Scales: BLEU is 0-100 (sacrebleu's convention), ROUGE-1/2/L are mean F1 in 0-1, perplexity is
exp(mean NLL per completion token), KL is nats per response (summed over its tokens).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.data.batching import pad_batch
from tunelab.data.templates import Rendered
from tunelab.logprobs import hidden_states, token_logprobs, trunk_and_head
from tunelab.safety import markdown_text


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, default 13a tokenization), 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def rouge(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 (rouge-score, with stemming), 0-1."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hypothesis, reference in zip(hypotheses, references):
        scores = scorer.score(reference, hypothesis)
        for key in totals:
            totals[key] += scores[key].fmeasure
    return {key: value / max(1, len(hypotheses)) for key, value in totals.items()}


@torch.no_grad()
def perplexity(model: nn.Module, rows: list[Rendered], pad_id: int, batch_size: int = 16) -> float:
    """exp(mean negative log-likelihood per trained token) of rendered rows (completions or text)."""
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = {k: v.to(device) for k, v in pad_batch([r.ids for r in chunk], [r.mask for r in chunk],
                                                        pad_id).items()}
        logprobs = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        nll -= float(logprobs.sum())
        tokens += int(batch["loss_mask"].sum())
    return math.exp(nll / tokens) if tokens else float("nan")


def win_rate(scores_a: list[float], scores_b: list[float], tie_tolerance: float = 1e-6) -> dict[str, float]:
    """Share of prompts where A's response outscores B's, a tie counting half, with a 95% interval.

    The interval is the normal approximation over per-prompt outcomes (1, 0.5 or 0):
    mean +- 1.96 * std / sqrt(n), clipped to [0, 1].
    """
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError(f"win rate needs two equally long, non-empty score lists (got {len(scores_a)} and "
                         f"{len(scores_b)})")
    outcomes = []
    for a, b in zip(scores_a, scores_b):
        outcomes.append(0.5 if abs(a - b) <= tie_tolerance else float(a > b))
    n = len(outcomes)
    rate = sum(outcomes) / n
    std = math.sqrt(sum((o - rate) ** 2 for o in outcomes) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * std / math.sqrt(n)
    return {"win_rate": rate, "wins": outcomes.count(1.0), "ties": outcomes.count(0.5),
            "losses": outcomes.count(0.0), "win_rate_ci_low": max(0.0, rate - half),
            "win_rate_ci_high": min(1.0, rate + half)}


def _scored_hidden(model: nn.Module, batch: dict) -> tuple[torch.Tensor, nn.Module]:
    """Hidden states `[N, H]` of the positions that predict scored tokens, and the model's LM head."""
    _, head = trunk_and_head(model)
    hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    return hidden[:, :-1][batch["loss_mask"][:, 1:].bool()], head


def _distribution_kl(policy: nn.Module, reference: nn.Module, batch: dict, chunk: int = 1024) -> torch.Tensor:
    """sum over scored positions of KL(policy(.|prefix) || reference(.|prefix)), per row `[B]`."""
    p_hidden, p_head = _scored_hidden(policy, batch)
    q_hidden, q_head = _scored_hidden(reference, batch)
    rows = batch["loss_mask"][:, 1:].bool().nonzero()[:, 0]
    per_row = torch.zeros(batch["input_ids"].shape[0], device=rows.device)
    for start in range(0, p_hidden.shape[0], chunk):
        log_p = F.log_softmax(p_head(p_hidden[start:start + chunk]).float(), -1)
        log_q = F.log_softmax(q_head(q_hidden[start:start + chunk]).float(), -1)
        per_row.index_add_(0, rows[start:start + chunk], (log_p.exp() * (log_p - log_q)).sum(-1))
    return per_row


@torch.no_grad()
def kl_to_reference(policy: nn.Module, reference: nn.Module, rows: list[Rendered], pad_id: int,
                    batch_size: int = 16) -> float:
    """Mean over rows of the exact KL(policy || reference) summed along each response's tokens.

    `rows` are prompt + response renderings (mask on the response), typically the policy's own
    generations; at each response position the full next-token distributions are compared.
    """
    device = next(policy.parameters()).device
    total = 0.0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = {k: v.to(device) for k, v in pad_batch([r.ids for r in chunk], [r.mask for r in chunk],
                                                        pad_id).items()}
        total += float(_distribution_kl(policy, reference, batch).sum())
    return total / max(1, len(rows))


def few_shot_prompts(rows: list, k: int, seed: int = 0) -> list[str]:
    """Prepend k solved examples (prompt + reference), drawn from the other rows, to every prompt."""
    pool = [i for i, r in enumerate(rows) if r.reference]
    if k and len(pool) <= k:
        raise ValueError(f"few-shot k={k} needs more than {k} rows with reference completions; found {len(pool)}")
    rng = random.Random(seed)
    prompts = []
    for i, row in enumerate(rows):
        shots = rng.sample([j for j in pool if j != i], k) if k else []
        prompts.append("".join(rows[j].prompt + rows[j].reference + "\n\n" for j in shots) + row.prompt)
    return prompts


def render_completions(prompts: list[str], completions: list[str], tokenizer) -> list[Rendered]:
    """Prompt + completion rows rendered with the loss mask on the completion (for perplexity and KL)."""
    from tunelab.data.formats import Example
    from tunelab.data.templates import render_example

    return [render_example(Example("prompt_completion", "", prompt=p, completion=c), tokenizer)
            for p, c in zip(prompts, completions)]


def run_eval(model_path: str, data_path: str, *, reward: str | None = None, compare: str | None = None,
             reference: str | None = None, options=None, few_shot: int = 0, limit: int | None = None) -> dict:
    """Generate for every prompt of `data_path` and compute every metric the inputs allow.

    BLEU/ROUGE need reference completions; perplexity uses the references (or text rows); reward
    mean/std need `reward`; the win rate needs `reward` and a second model `compare`; KL needs a
    `reference` model. Returns flat metrics plus `generations` (prompt, response, reference).
    """
    from tunelab.generation import GenerationOptions, prompt_examples, prompt_rows, resolve_model_dir
    from tunelab.modeling import load_for_inference
    from tunelab.rewards import RewardScorer
    from tunelab.rollout import generate

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be 1 or more (rows to evaluate), got {limit}")
    options = options or GenerationOptions()
    gen_kwargs = asdict(options)
    examples = prompt_examples(data_path)[:limit]
    model, tokenizer = load_for_inference(resolve_model_dir(model_path))
    rows = prompt_rows(examples, tokenizer)
    prompts = few_shot_prompts(rows, few_shot, options.seed or 0)
    responses = generate(model, tokenizer, prompts, **gen_kwargs)
    results: dict = {"n": len(rows)}
    with_reference = [(r, out) for r, out in zip(rows, responses) if r.reference is not None]
    if with_reference:
        hyps, refs = [out for _, out in with_reference], [r.reference for r, _ in with_reference]
        results["bleu"] = bleu(hyps, refs)
        results.update(rouge(hyps, refs))
        scored = render_completions([r.prompt for r, _ in with_reference], refs, tokenizer)
        results["perplexity"] = perplexity(model, scored, tokenizer.pad_token_id, options.batch_size)
    if reward:
        scorer = RewardScorer(resolve_model_dir(reward), batch_size=options.batch_size)
        scores = scorer.score([r.prompt for r in rows], responses)
        results["reward_mean"] = sum(scores) / len(scores)
        results["reward_std"] = float(torch.tensor(scores).std()) if len(scores) > 1 else 0.0
        if compare:
            other, other_tokenizer = load_for_inference(resolve_model_dir(compare))
            other_responses = generate(other, other_tokenizer, prompts, **gen_kwargs)
            results.update(win_rate(scores, scorer.score([r.prompt for r in rows], other_responses)))
    elif compare:
        raise ValueError("a win rate needs a judge: pass --reward with the reward model")
    if reference:
        ref_model, _ = load_for_inference(resolve_model_dir(reference))
        results["kl"] = kl_to_reference(model, ref_model, render_completions(prompts, responses, tokenizer),
                                        tokenizer.pad_token_id, options.batch_size)
    results["generations"] = [{"prompt": r.prompt, "response": out, "reference": r.reference}
                              for r, out in zip(rows, responses)]
    return results


def markdown_table(results: dict[str, dict]) -> str:
    """A Markdown table: one row per model, one column per metric any of them has."""
    columns = []
    for metrics in results.values():
        columns += [k for k, v in metrics.items() if isinstance(v, (int, float)) and k not in columns]
    lines = ["| model | " + " | ".join(markdown_text(c) for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in results.items():
        cells = [f"{metrics[c]:.4g}" if isinstance(metrics.get(c), float) else str(metrics.get(c, "")) for c in columns]
        lines.append(f"| {markdown_text(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_eval(paths: dict[str, Path], results: dict, generations: list[dict], table: str) -> None:
    """Write an evaluation's metrics (JSON, flat keys), its table (Markdown) and its generations (JSONL) to the
    files `paths` names (keys results, table, generations), each atomically."""
    import json

    from tunelab.checkpoint import atomic_write_text

    atomic_write_text(paths["results"], json.dumps(results, indent=2) + "\n")
    atomic_write_text(paths["table"], table + "\n")
    atomic_write_text(paths["generations"], "".join(json.dumps(g) + "\n" for g in generations))

"""`tunelab demo`: the whole pipeline on a world built from nothing, as real recipe runs.

Stages (each a real run directory under the output):
  world/  tokenizer, randomly initialised tiny Llama, synthetic review data files
  base/   continued training on raw review text (full parameters): the "base model"
  sft/    instruction tuning (LoRA) on "Write a review of <title>." -> a review
  rm/     a reward model from the SFT model, trained on review pairs (the positive review preferred)
  dpo/    DPO from the SFT model (LoRA) on the same pairs; its effect is measured as the share of positive
          reviews among sampled generations, judged by the world's sentiment lexicon (no trained model)
  ppo/    RLHF with PPO from the SFT model (LoRA: policy, value head and reference share one base) against
          the reward model, judged the same way, with the KL to the SFT model
  grpo/   critic-free RL (GRPO) from the SFT model (LoRA) against the same reward model: 4 responses per
          prompt, each one's advantage from its group, no value head
  report/ an evaluation table of base, SFT, DPO, PPO and GRPO (positive share, reward score, win rate against
          SFT, KL to SFT, BLEU against positive reference reviews) and plots of every run's metrics
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.checkpoint import RunDirError
from tunelab.config import (DataConfig, DataSource, DPOConfig, GRPOConfig, ModelConfig, PPOConfig, RMConfig,
                            SFTConfig, TrainConfig)
from tunelab.data.dataset import prepare_sft_data
from tunelab.data.templates import alpaca_prompt
from tunelab.demo import world
from tunelab.logprobs import LogprobModel
from tunelab.loop import evaluate
from tunelab.evaluation import bleu, kl_to_reference, markdown_table, render_completions, win_rate
from tunelab.modeling import load_for_inference, merge_adapter
from tunelab.report import write_report
from tunelab.rewards import RewardScorer
from tunelab.recipes.dpo import run_dpo
from tunelab.recipes.grpo import run_grpo
from tunelab.recipes.ppo import run_ppo
from tunelab.recipes.reward import run_rm
from tunelab.recipes.common import collate_rendered, eval_batches, log
from tunelab.recipes.sft import run_sft, sft_step
from tunelab.rollout import generate

MARKER = "demo.json"


@dataclass(frozen=True)
class DemoSize:
    """How big the demo world is and how long each stage trains."""

    corpus_reviews: int
    instruction_rows: int
    hidden_size: int
    num_layers: int
    base_epochs: float
    sft_epochs: float
    preference_pairs: int
    rm_epochs: float
    dpo_epochs: float
    ppo_prompts: int
    ppo_iterations: int
    judged_prompts: int
    samples: int


FULL = DemoSize(corpus_reviews=4000, instruction_rows=2000, hidden_size=128, num_layers=4,
                base_epochs=3, sft_epochs=2, preference_pairs=800, rm_epochs=1,
                dpo_epochs=1, ppo_prompts=512, ppo_iterations=30, judged_prompts=64, samples=4)
QUICK = DemoSize(corpus_reviews=600, instruction_rows=300, hidden_size=64, num_layers=2,
                 base_epochs=2, sft_epochs=1, preference_pairs=200, rm_epochs=2,
                 dpo_epochs=1, ppo_prompts=64, ppo_iterations=3, judged_prompts=16, samples=2)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_world(directory: Path, size: DemoSize, seed: int = 0) -> dict[str, Path]:
    """Write the world's tokenizer + initial model and its data files; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus = world.make_reviews(size.corpus_reviews, seed)
    tasks = world.make_reviews(size.instruction_rows, seed + 1)
    held_titles = world.make_titles(size.judged_prompts, seed + 2)
    instructions = [{"instruction": world.review_instruction(r["title"]), "output": r["text"]} for r in tasks]
    tokenizer_texts = [r["text"] for r in corpus] + [alpaca_prompt(r["instruction"]) for r in instructions]
    tokenizer = world.build_tokenizer(tokenizer_texts)
    model = world.build_tiny_model(tokenizer, hidden_size=size.hidden_size, num_layers=size.num_layers, seed=seed)
    rng = random.Random(seed + 3)
    # the positive review is preferred over a negative one, and (for a third of the pairs) over one with
    # no opinion, so that the reward model pays for positive sentiment rather than for review boilerplate
    pairs = [{"prompt": alpaca_prompt(world.review_instruction(t)), "chosen": world.make_review(t, True, rng),
              "rejected": world.make_neutral_review(t, rng) if i % 3 == 2 else world.make_review(t, False, rng)}
             for i, t in enumerate(world.make_titles(size.preference_pairs, seed + 3))]
    paths = {"init": directory / "init", "corpus": directory / "reviews.jsonl",
             "instructions": directory / "instructions.jsonl", "prompts": directory / "prompts.jsonl",
             "pairs": directory / "pairs.jsonl", "ppo_prompts": directory / "ppo_prompts.jsonl"}
    _write_jsonl(paths["pairs"], pairs)
    _write_jsonl(paths["ppo_prompts"], [{"prompt": alpaca_prompt(world.review_instruction(t))}
                                        for t in world.make_titles(size.ppo_prompts, seed + 4)])
    model.save_pretrained(paths["init"])
    tokenizer.save_pretrained(paths["init"])
    _write_jsonl(paths["corpus"], [{"text": r["text"]} for r in corpus])
    _write_jsonl(paths["instructions"], instructions)
    reference_rng = random.Random(seed + 5)
    _write_jsonl(paths["prompts"], [{"prompt": alpaca_prompt(world.review_instruction(t)),
                                     "completion": world.make_review(t, True, reference_rng)} for t in held_titles])
    return paths


def _samples(model_dir: Path, prompts: list[str], seed: int) -> list[str]:
    model, tokenizer = load_for_inference(str(model_dir))
    return generate(model, tokenizer, prompts, max_new_tokens=48, temperature=0.7, top_p=0.95, seed=seed)


def positive_share(responses: list[str]) -> float:
    """Share of responses the lexicon judge calls positive."""
    return sum(world.is_positive(r) for r in responses) / len(responses)


def evaluation_table(models: dict[str, Path], sft: Path, reward_model: Path, judged: list[dict],
                     seed: int) -> dict[str, dict[str, float]]:
    """Per model, on the same sampled prompts: positive share (lexicon), reward score, win rate against
    SFT (judged by the reward model), KL to SFT, and BLEU against positive reference reviews."""
    prompts = [row["prompt"] for row in judged]
    references = [row["completion"] for row in judged]
    scorer = RewardScorer(reward_model)
    sft_model, tokenizer = load_for_inference(str(sft))
    responses = {name: _samples(path, prompts, seed) for name, path in models.items()}
    sft_scores = scorer.score(prompts, responses["sft"])
    table = {}
    for name, path in models.items():
        scores = sft_scores if name == "sft" else scorer.score(prompts, responses[name])
        model, _ = load_for_inference(str(path))
        rendered = render_completions(prompts, responses[name], tokenizer)
        table[name] = {
            "positive_share": positive_share(responses[name]),
            "reward_mean": sum(scores) / len(scores),
            "win_rate_vs_sft": win_rate(scores, sft_scores)["win_rate"],
            "kl_to_sft": kl_to_reference(model, sft_model, rendered, tokenizer.pad_token_id),
            "bleu": bleu(responses[name], references),
        }
    return table


def _held_out_loss(model_dir: Path, config: SFTConfig) -> float:
    """Completion loss of a model on the SFT run's held-out rows (the same split the run used)."""
    model, tokenizer = load_for_inference(str(model_dir))
    data = prepare_sft_data(config.data, tokenizer, seed=config.train.seed)
    batches = eval_batches(data.held_out, [len(r.ids) for r in data.held_out], config.train.batch_size,
                           lambda rows: collate_rendered(rows, tokenizer.pad_token_id))
    return evaluate(LogprobModel(model), batches, sft_step, torch.device("cpu"))["loss"]


def _prepare_output(output: Path, overwrite: bool) -> None:
    if output.exists() and any(output.iterdir()):
        if not (overwrite or (output / MARKER).is_file()):
            raise RunDirError(f"{output} holds files that are not an earlier demo; pass --overwrite or "
                              "choose another --output")
        shutil.rmtree(output)  # an earlier demo is replaced
    output.mkdir(parents=True)


def run_demo(output: str = "runs/demo", quick: bool = False, overwrite: bool = False, seed: int = 0) -> dict:
    """Run the demo stages and return the figures it printed (also written to <output>/demo.json)."""
    size = QUICK if quick else FULL
    out = Path(output)
    _prepare_output(out, overwrite)
    started = time.time()
    timings: dict[str, float] = {}

    log(f"[world] building tokenizer, a tiny Llama ({size.hidden_size} hidden, {size.num_layers} layers) and "
        f"{size.corpus_reviews} + {size.instruction_rows} synthetic reviews in {out / 'world'}")
    paths = build_world(out / "world", size, seed)
    timings["world"] = time.time() - started
    judged = [json.loads(line) for line in paths["prompts"].read_text().splitlines()]
    prompts = [row["prompt"] for row in judged[:size.samples]]

    def stage_config(model: Path, data: Path, run: str, peft: str, lr: float, epochs: float) -> SFTConfig:
        return SFTConfig(model=ModelConfig(name_or_path=str(model)), peft=peft, output=str(out / run),
                         data=DataConfig(sources=[DataSource(path=str(data))], max_length=128, eval_fraction=0.1),
                         train=TrainConfig(lr=lr, epochs=epochs, batch_size=16, warmup_ratio=0.05, seed=seed,
                                           log_every=25, report=not quick))

    log("\n[base] continued training on raw review text (full parameters)")
    t0 = time.time()
    base_config = stage_config(paths["init"], paths["corpus"], "base", "none", 3e-3, size.base_epochs)
    base = run_sft(base_config, quiet=True)
    timings["base"] = time.time() - t0

    log("\n[sft] instruction tuning with LoRA: 'Write a review of <title>.' -> review")
    t0 = time.time()
    sft_config = stage_config(base.final_dir, paths["instructions"], "sft", "lora", 3e-3, size.sft_epochs)
    sft_config.lora.r = 16
    sft = run_sft(sft_config, quiet=True)
    timings["sft"] = time.time() - t0

    log("\n[rm] reward model from the SFT model: review pairs, the positive review preferred")
    t0 = time.time()
    sft_model = merge_adapter(str(sft.final_dir), str(out / "sft" / "merged"))
    rm_config = RMConfig(model=ModelConfig(name_or_path=str(sft_model)), peft="none", output=str(out / "rm"),
                         data=DataConfig(sources=[DataSource(path=str(paths["pairs"]))], max_length=192,
                                         eval_fraction=0.1),
                         train=TrainConfig(lr=1e-3, epochs=size.rm_epochs, batch_size=8, warmup_ratio=0.05,
                                           seed=seed, log_every=25, report=not quick))
    rm = run_rm(rm_config, quiet=True)
    rm_accuracy = rm.train.eval_metrics["accuracy"]
    timings["rm"] = time.time() - t0

    log("\n[dpo] direct preference optimization from the SFT model (LoRA) on the same review pairs")
    t0 = time.time()
    dpo_config = DPOConfig(model=ModelConfig(name_or_path=str(sft_model)), peft="lora", output=str(out / "dpo"),
                           data=DataConfig(sources=[DataSource(path=str(paths["pairs"]))], max_length=192,
                                           eval_fraction=0.1),
                           train=TrainConfig(lr=2e-3, epochs=size.dpo_epochs, batch_size=8, warmup_ratio=0.05,
                                             seed=seed, log_every=25, report=not quick))
    dpo_config.lora.r = 16
    dpo = run_dpo(dpo_config, quiet=True)
    timings["dpo"] = time.time() - t0

    log("\n[ppo] RLHF with PPO from the SFT model (LoRA) against the reward model")
    t0 = time.time()

    def online_config(cls, run: str, batch_size: int):
        """PPO's and GRPO's shared settings: LoRA on the SFT model, the reward model, 40-token responses."""
        config = cls(model=ModelConfig(name_or_path=str(sft_model)), peft="lora", output=str(out / run),
                     data=DataConfig(sources=[DataSource(path=str(paths["ppo_prompts"]))], eval_fraction=0.0),
                     train=TrainConfig(lr=3e-3, max_steps=size.ppo_iterations, batch_size=batch_size,
                                       warmup_ratio=0.0, seed=seed, log_every=5, report=not quick))
        config.reward.source = str(rm.run_dir)
        config.generation.max_new_tokens = 40
        config.lora.r = 16
        return config

    ppo_config = online_config(PPOConfig, "ppo", 32)
    ppo_config.ppo.kl_coef = 0.05
    ppo_config.ppo.minibatch_size = 16
    ppo = run_ppo(ppo_config, quiet=True)
    tail = ppo.history[-5:]
    ppo_kl = sum(h["kl"] for h in tail) / len(tail)
    timings["ppo"] = time.time() - t0

    log("\n[grpo] critic-free RL (GRPO) from the SFT model (LoRA) against the same reward model: 4 reviews per "
        "prompt, each judged against its group")
    t0 = time.time()
    grpo_config = online_config(GRPOConfig, "grpo", 8)  # 8 prompts x 4 responses: PPO's 32 responses
    grpo_config.rl.kl_coef = 0.05
    grpo = run_grpo(grpo_config, quiet=True)
    grpo_tail = grpo.history[-5:]
    timings["grpo"] = time.time() - t0

    log("\n[eval] base, SFT, DPO, PPO and GRPO on the same unseen prompts")
    t0 = time.time()
    table = evaluation_table({"base": base.final_dir, "sft": sft_model, "dpo": dpo.final_dir, "ppo": ppo.final_dir,
                              "grpo": grpo.final_dir}, sft_model, rm.final_dir, judged, seed)
    share = {name: row["positive_share"] for name, row in table.items()}
    report = write_report([base.run_dir, sft.run_dir, rm.run_dir, dpo.run_dir, ppo.run_dir, grpo.run_dir],
                          out / "report")
    timings["eval"] = time.time() - t0
    t0 = time.time()
    base_loss = _held_out_loss(base.final_dir, sft_config)
    sft_loss = sft.train.eval_metrics["loss"]
    before = _samples(base.final_dir, prompts, seed)
    after = _samples(sft.final_dir, prompts, seed)
    timings["samples"] = time.time() - t0

    log("\n[samples] the same unseen prompts, before (base) and after (sft) instruction tuning:")
    for prompt, old, new in zip(prompts, before, after):
        instruction = prompt.split("### Instruction:\n")[1].split("\n")[0]
        log(f"  {instruction}\n    base: {old.strip()[:160]!r}\n    sft:  {new.strip()[:160]!r}")
    figures = {
        "quick": quick,
        "runs": {"world": str(out / "world"), "base": str(base.run_dir), "sft": str(sft.run_dir),
                 "rm": str(rm.run_dir), "dpo": str(dpo.run_dir), "ppo": str(ppo.run_dir),
                 "grpo": str(grpo.run_dir)},
        "held_out_loss": {"base": round(base_loss, 4), "sft": round(sft_loss, 4)},
        "rm_held_out_accuracy": round(rm_accuracy, 4),
        "dpo_held_out_reward_accuracy": round(dpo.train.eval_metrics["reward_accuracy"], 4),
        "positive_share": {k: round(v, 4) for k, v in share.items()},
        "evaluation": {name: {k: round(v, 4) for k, v in row.items()} for name, row in table.items()},
        "report": str(report),
        "ppo_score": {"first": round(ppo.history[0]["score_mean"], 4), "last": round(tail[-1]["score_mean"], 4)},
        "ppo_kl_to_sft": round(ppo_kl, 4),
        "grpo_score": {"first": round(grpo.history[0]["score_mean"], 4),
                       "last": round(sum(h["score_mean"] for h in grpo_tail) / len(grpo_tail), 4)},
        "judged_generations": len(judged),
        "seconds": {k: round(v, 1) for k, v in timings.items()} | {"total": round(time.time() - started, 1)},
    }
    (out / MARKER).write_text(json.dumps(figures, indent=2))
    log(f"\nheld-out completion loss on the SFT task: base {base_loss:.3f} -> sft {sft_loss:.3f}")
    log(f"reward model held-out accuracy (positive review preferred): {rm_accuracy:.3f}")
    log(f"positive share of {len(judged)} sampled reviews (lexicon judge): sft {100 * share['sft']:.0f}%, "
        f"dpo {100 * share['dpo']:.0f}%, ppo {100 * share['ppo']:.0f}%, grpo {100 * share['grpo']:.0f}% (ppo KL to "
        f"sft {ppo_kl:.2f} nats per response)")
    log(f"\nevaluation on {len(judged)} unseen prompts (sampled at temperature 0.7; KL in nats per response; "
        "BLEU against positive reference reviews):\n" + markdown_table(table))
    log(f"plots and report: {report}")
    log(f"runs: {out / 'base'} (base model), {out / 'sft'} (instruction-tuned adapter; merged in sft/merged), "
        f"{out / 'rm'} (reward model), {out / 'dpo'} (DPO adapter), {out / 'ppo'} (PPO adapter), {out / 'grpo'} "
        "(GRPO adapter)")
    log("wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in figures["seconds"].items()))
    return figures

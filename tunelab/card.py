"""The model card of a run: README.md with Hugging Face metadata (YAML front matter) and what was trained how.

Written into final/ (replacing peft's blank template of an adapter), carried into `tunelab merge` output
and written beside a `tunelab export` GGUF file. The metadata comes from `huggingface_hub.ModelCardData`:
base_model, library_name (transformers, peft, or sentence-transformers for a contrastive run's encoder),
tags (tunelab, the recipe, the PEFT method; sentence-transformers' own for its models) and datasets (the
sources named like hub datasets). The body gives the recipe, the PEFT settings, each data source with
its row counts, the settings that differ from the defaults, steps and epochs, the last training and
held-out metrics (as metrics.jsonl holds them), for a contrastive run the held-out retrieval before and
after training, and how to load the model.
"""

from __future__ import annotations

import re
from pathlib import Path

from tunelab.config import flatten

RECIPES = {"SFTConfig": ("sft", "supervised fine-tuning"), "RMConfig": ("rm", "reward modeling (Bradley-Terry)"),
           "DPOConfig": ("dpo", "direct preference optimization"), "KTOConfig": ("kto", "KTO on unpaired feedback"),
           "PPOConfig": ("ppo", "RLHF with PPO"), "GRPOConfig": ("grpo", "GRPO (critic-free RL)"),
           "RLOOConfig": ("rloo", "RLOO (critic-free RL)"),
           "ContrastiveConfig": ("contrastive", "contrastive embedding training")}
ONLINE = ("ppo", "grpo", "rloo")
NOT_METRICS = ("step", "epoch", "split", "lr", "tokens_per_s", "elapsed_s", "iteration_s", "generate_s", "rollout_s", "learn_s")
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def hub_dataset(path: str) -> str | None:
    """`path` when it names a hub dataset (`name` or `owner/name`, no such local file), else None."""
    return path if HUB_NAME.fullmatch(path) and not Path(path).expanduser().exists() else None


def changed_settings(config) -> dict:
    """The config keys whose value differs from the recipe's default (model, data sources and output aside)."""
    ours, defaults = flatten(config.model_dump(mode="json")), flatten(type(config)().model_dump(mode="json"))
    skip = ("model.name_or_path", "data.sources", "output")
    return {k: v for k, v in ours.items() if k not in skip and defaults.get(k) != v}


def last_metrics(metrics_file: Path) -> tuple[dict, dict]:
    """(last training record, the held-out records of the last evaluated step, merged, without their `eval_`
    prefixes) of a metrics.jsonl."""
    from tunelab.jsonlog import read_jsonl

    records = read_jsonl(metrics_file, warn=False) if metrics_file.is_file() else []
    train = next((r for r in reversed(records) if "split" not in r), {})
    evals = [r for r in records if r.get("split") == "eval"]
    held: dict = {}
    for record in (r for r in evals if r.get("step") == evals[-1].get("step")):  # every held-out record of that step
        held.update(record)
    return train, {k.removeprefix("eval_"): v for k, v in held.items() if k.startswith("eval_")}


def peft_text(config) -> str:
    if config.peft in ("lora", "qlora"):
        lora = config.lora
        text = (f"LoRA (r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g}, target modules "
                f"{lora.target_modules if isinstance(lora.target_modules, str) else ', '.join(lora.target_modules)})")
        if config.peft == "qlora":
            q = config.quantization
            text = f"QLoRA: {text} on a {q.bits}-bit {q.type if q.bits == 4 else 'int8'} base"
        return text
    if config.peft == "prompt":
        return f"prompt tuning ({config.prompt_tuning.num_virtual_tokens} virtual tokens)"
    return "full fine-tuning (all weights)"


def _number(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def is_seq2seq_folder(folder: Path) -> bool:
    """True when `folder` holds an encoder-decoder language model or an adapter for one."""
    import json

    try:
        if (folder / "adapter_config.json").is_file():
            return json.loads((folder / "adapter_config.json").read_text()).get("task_type") == "SEQ_2_SEQ_LM"
        return bool(json.loads((folder / "config.json").read_text()).get("is_encoder_decoder"))
    except (OSError, ValueError, AttributeError):
        return False


def load_snippet(folder: str, recipe: str, library: str, seq2seq: bool = False) -> str:
    """Python that loads the model saved in `folder` with plain transformers / peft (`seq2seq`: an
    encoder-decoder, loaded with the Seq2SeqLM classes)."""
    if seq2seq and recipe not in ("rm", "contrastive"):
        auto = "AutoPeftModelForSeq2SeqLM" if library == "peft" else "AutoModelForSeq2SeqLM"
        package = "peft" if library == "peft" else "transformers"
        return (f'from {package} import {auto}\nfrom transformers import AutoTokenizer\n\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{folder}")\n'
                f'model = {auto}.from_pretrained("{folder}")\n'
                'inputs = tokenizer("Summarize: ...", return_tensors="pt")\n'
                'print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0], skip_special_tokens=True))')
    if recipe == "rm":
        if library == "peft":
            return (f'from peft import AutoPeftModelForSequenceClassification\nfrom transformers import AutoTokenizer\n\n'
                    f'tokenizer = AutoTokenizer.from_pretrained("{folder}")\n'
                    f'model = AutoPeftModelForSequenceClassification.from_pretrained("{folder}", num_labels=1)\n'
                    f'reward = model(**tokenizer(prompt + response, return_tensors="pt")).logits[0, 0]')
        return (f'from transformers import pipeline\n\nscore = pipeline("text-classification", model="{folder}")\n'
                f'score(prompt + response)  # [{{"label": "reward", "score": ...}}]')
    if library == "sentence-transformers":
        return (f'from sentence_transformers import SentenceTransformer\n\nmodel = SentenceTransformer("{folder}")\n'
                f'embeddings = model.encode(["first text", "second text"])  # or: tunelab embed --model {folder}')
    if recipe == "contrastive":
        return (f'from transformers import AutoModel, AutoTokenizer\n\ntokenizer = AutoTokenizer.from_pretrained('
                f'"{folder}")\nmodel = AutoModel.from_pretrained("{folder}")  # or: tunelab embed --model {folder}')
    load = (f'from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer, GenerationConfig\n\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{folder}")\n'
            f'model = AutoPeftModelForCausalLM.from_pretrained("{folder}")\n'
            f'model.generation_config = GenerationConfig.from_pretrained("{folder}")  # stops at the end of a turn\n'
            if library == "peft" else
            f'from transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{folder}")\n'
            f'model = AutoModelForCausalLM.from_pretrained("{folder}")\n')
    return load + ('inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], '
                   'add_generation_prompt=True, return_tensors="pt", return_dict=True)\n'
                   'print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))')


SENTENCE_TRANSFORMERS_TAGS = ["sentence-transformers", "sentence-similarity", "feature-extraction"]


def render_card(config, data, metrics_file: Path, folder: Path, *, library: str,
                retrieval: tuple[dict, dict] | None = None, seq2seq: bool = False):
    """The card (a `huggingface_hub.ModelCard`) of a run with `config`, its `data` (a TokenizedData) and
    metrics; `folder` is where the model will be, named in the loading code (`seq2seq`: an encoder-decoder).
    `retrieval` is a contrastive run's held-out retrieval metrics (before, after training)."""
    from huggingface_hub import ModelCard, ModelCardData

    recipe, recipe_words = RECIPES.get(type(config).__name__, ("train", "training"))
    base = config.model.name_or_path
    sources = list(getattr(data, "sources", []))
    datasets = [name for name in (hub_dataset(s.path) for s in sources) if name]
    tags = ["tunelab", recipe, config.peft if config.peft != "none" else "full-fine-tuning"]
    pipeline_tag = {"rm": "text-classification", "contrastive": "feature-extraction"}.get(
        recipe, "text2text-generation" if seq2seq else "text-generation")
    if library == "sentence-transformers":
        tags, pipeline_tag = tags + SENTENCE_TRANSFORMERS_TAGS, "sentence-similarity"
    meta = ModelCardData(base_model=base, library_name=library, tags=tags, datasets=datasets or None,
                         pipeline_tag=pipeline_tag)
    train, held = last_metrics(metrics_file)
    unit = "iterations" if recipe in ONLINE else "optimizer steps"
    lines = [f"# {Path(config.output).name or 'tunelab model'}", "",
             f"Trained with tunelab: {recipe_words} (`tunelab {recipe}`) from `{base}`.", "",
             f"- **Recipe:** `{recipe}`",
             f"- **Parameters trained:** {peft_text(config)}",
             f"- **Steps:** {train.get('step', 0)} {unit}" + (f", {train['epoch']:g} epochs" if "epoch" in train
                                                                else ""),
             f"- **Learning rate:** {config.resolved_lr():g} (peak, {config.train.schedule} schedule)", "",
             "## Data", "",
             "| source | format | rows | train | held out | weight |", "|---|---|---|---|---|---|"]
    lines += [f"| `{s.path}` | {s.format} | {s.rows} | {s.train} | {s.held_out} | {s.weight:g} |" for s in sources]
    changed = changed_settings(config)
    lines += ["", "## Settings that differ from the defaults", ""]
    lines += ([f"- `{key}`: `{value}`" for key, value in changed.items()] if changed
              else ["None: every other setting is tunelab's default."])
    keys = [k for k in train if k not in NOT_METRICS] + [k for k in held if k not in train]
    lines += ["", "## Results", ""]
    if keys:
        lines += ["| metric | last training | held out |", "|---|---|---|"]
        lines += [f"| {k} | {_number(train[k]) if k in train else ''} | {_number(held[k]) if k in held else ''} |"
                  for k in keys]
    else:
        lines += ["No metrics were logged."]
    before, after = retrieval or ({}, {})
    if before or after:
        lines += ["", "## Held-out retrieval", "",
                  "Each held-out anchor's positive retrieved among every held-out positive.", "",
                  "| metric | before training | after training |", "|---|---|---|"]
        lines += [f"| {k.removeprefix('retrieval_')} | {_number(before[k]) if k in before else ''} | "
                  f"{_number(after[k]) if k in after else ''} |" for k in dict.fromkeys([*before, *after])]
    lines += ["", "## Load it", "", "```python", load_snippet(str(folder), recipe, library, seq2seq), "```", ""]
    return ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_run_card(folder: Path, config, data, metrics_file: Path, final_folder: Path) -> None:
    """Write README.md into `folder` (the model being saved, to end up at `final_folder`)."""
    library = "peft" if (folder / "adapter_config.json").is_file() else "transformers"
    render_card(config, data, metrics_file, final_folder, library=library,
                seq2seq=is_seq2seq_folder(folder)).save(folder / "README.md")


def carry_card(source: Path, target: Path, *, library: str, note: str, folder: str, gguf: str | None = None) -> bool:
    """Copy the tunelab card in `source` (a final/ or adapter folder) to `target` (a file) as the card of a
    merged model or GGUF file: its library, its loading code and a note on what was done. False when
    `source` holds no tunelab card."""
    from huggingface_hub import ModelCard

    readme = source / "README.md"
    if not readme.is_file():
        return False
    card = ModelCard.load(readme)
    if "tunelab" not in (card.data.tags or []):
        return False
    recipe = next((t for t in card.data.tags if t in {r for r, _ in RECIPES.values()}), "sft")
    card.data.library_name = library
    if gguf:
        card.data.tags = [*card.data.tags, "gguf"]
        snippet = (f'from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained('
                   f'"{folder}", gguf_file="{gguf}")  # or: llama-cli -m {Path(folder) / gguf}')
    else:
        snippet = load_snippet(folder, recipe, library, is_seq2seq_folder(source))
    body = card.text.split("## Load it")[0].rstrip()
    body = body.replace("\n## Data", f"\n{note}\n\n## Data", 1)
    card.text = f"{body}\n\n## Load it\n\n```python\n{snippet}\n```\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    card.save(target)
    return True

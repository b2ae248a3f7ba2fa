"""One benchmark workload with one tool, in its own process: `python worker.py TOOL WORKLOAD WORLD_DIR OUT_JSON`.

TOOL is tunelab, trl (TRL as shipped: its trainers' defaults, gradient checkpointing on) or trl-tuned (TRL at its
fastest settings here: gradient checkpointing off; SFT padding-free; DPO with the reference's log-probs
precomputed before training); WORKLOAD is sft, rm, dpo, ppo or grpo. BENCH_PRECISION (fp32, the default, or
bf16) sets both tools' precision: tunelab's train.precision, TRL's bf16 (autocast through accelerate). BENCH_DEVICE
(cpu, the default, or cuda) says where both run; on cuda the peak memory is also taken from PyTorch's CUDA allocator
(the most it reserved, and the most it handed out). The timed span starts after the imports and ends
after the trained model is written: model loading, tokenization, the training epoch and the final save,
for both tools alike. Peak RSS is the process's high-water mark (VmHWM in /proc/self/status; ru_maxrss
would also count the parent's memory at fork time). run.py starts this script once per
(tool, workload), each in a fresh process, with the same thread count.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

# shared settings: same for both tools
BATCH = 8
LR = {"sft": 1e-5, "rm": 1e-5, "dpo": 1e-6, "ppo": 1e-6, "grpo": 1e-6}
MAX_LENGTH = 512
BETA = 0.1
PPO_EPOCHS = 4
RESPONSE_LENGTH = 64
TEMPERATURE = 0.7
# GRPO: BATCH prompts per iteration (PPO's prompts, read from the same file), GRPO_GENERATIONS responses to each,
# GRPO_PASSES passes over each rollout batch, GRPO_MINIBATCH responses per optimizer step, KL weight GRPO_BETA
GRPO_GENERATIONS = 4
GRPO_PASSES = 2
GRPO_MINIBATCH = 16
GRPO_BETA = 0.04


def run_tunelab(workload: str, world: dict, out: str) -> dict | None:
    from tunelab.cli import main

    common = ["--output", out, "--batch-size", str(BATCH), "--lr", str(LR[workload]), "--peft", "none", "--quiet",
              f"train.precision={precision()}",
              "train.schedule=linear", "train.warmup_ratio=0", "data.eval_fraction=0",
              f"data.max_length={MAX_LENGTH}", "train.report=false", "train.log_every=1000"]
    if workload in ("sft", "rm", "dpo"):
        argv = [workload, "--model", world["policy"], "--data", world[workload], "--epochs", "1"]
        if workload == "dpo":
            argv.append(f"dpo.beta={BETA}")
    elif workload == "ppo":  # one epoch over the prompts: one iteration per batch of them
        prompts = sum(1 for _ in open(world["ppo"]))
        argv = ["ppo", "--model", world["policy"], "--data", world["ppo"], "--reward", world["reward"],
                "--max-steps", str(prompts // BATCH), f"ppo.epochs={PPO_EPOCHS}", f"ppo.minibatch_size={BATCH}",
                f"generation.max_new_tokens={RESPONSE_LENGTH}", f"generation.min_new_tokens={RESPONSE_LENGTH}",
                f"generation.temperature={TEMPERATURE}", "ppo.sample_every=0", "reward.batch_size=8"]
    else:  # grpo on PPO's prompts, one iteration per batch of them; the reward is benchmarks/grpo_reward.py
        prompts = sum(1 for _ in open(world["ppo"]))
        argv = ["grpo", "--model", world["policy"], "--data", world["ppo"], "--reward", "grpo_reward:reward",
                "--max-steps", str(prompts // BATCH), f"rl.num_generations={GRPO_GENERATIONS}",
                f"rl.epochs={GRPO_PASSES}", f"rl.minibatch_size={GRPO_MINIBATCH}", "rl.kl=loss",
                f"rl.kl_coef={GRPO_BETA}", "rl.scale_rewards=true", "rl.loss_norm=token", "rl.clip_range=0.2",
                f"generation.max_new_tokens={RESPONSE_LENGTH}", f"generation.min_new_tokens={RESPONSE_LENGTH}",
                f"generation.temperature={TEMPERATURE}", "rl.sample_every=0"]
    status = main(argv + common)
    if status != 0:
        raise SystemExit(f"tunelab {workload} exited with status {status}")
    if workload == "grpo":
        return _tunelab_grpo_checks(Path(out))


def _tunelab_grpo_checks(run_dir: Path) -> dict:
    """What the run did, from its metrics.jsonl (one record per iteration): iterations, optimizer steps and the
    response lengths in tokens (mean of each iteration's mean; min and max of those means)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if "response_length" in r]
    lengths = [r["response_length"] for r in records]
    return {"iterations": len(records), "optimizer_steps": int(sum(r["updates"] for r in records)),
            "response_tokens_mean": sum(lengths) / max(len(lengths), 1),
            "response_tokens_min": min(lengths, default=0), "response_tokens_max": max(lengths, default=0)}


def precision() -> str:
    value = os.environ.get("BENCH_PRECISION", "fp32")
    if value not in ("fp32", "bf16"):
        raise SystemExit(f"BENCH_PRECISION={value!r}: expected fp32 or bf16")
    return value


def device() -> str:
    value = os.environ.get("BENCH_DEVICE", "cpu")
    if value not in ("cpu", "cuda"):
        raise SystemExit(f"BENCH_DEVICE={value!r}: expected cpu or cuda")
    return value


def _trl_common(workload: str, out: str, tuned: bool = False) -> dict:
    """TRL's TrainingArguments shared by every workload; tuned turns gradient checkpointing off (TRL's configs
    turn it on by default)."""
    common = dict(output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                  learning_rate=LR[workload], num_train_epochs=1, lr_scheduler_type="linear", warmup_steps=0,
                  bf16=precision() == "bf16", fp16=False, use_cpu=device() == "cpu", report_to="none", save_strategy="no",
                  logging_steps=1000, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    if tuned:
        common["gradient_checkpointing"] = False
    return common


def _trl_checks(trainer) -> dict:
    """What the TRL run did: optimizer steps, its mean training loss and whether it checkpointed activations."""
    return {"optimizer_steps": trainer.state.global_step,
            "train_loss": next((r["train_loss"] for r in reversed(trainer.state.log_history) if "train_loss" in r),
                               None),
            "gradient_checkpointing": bool(trainer.args.gradient_checkpointing)}


def run_trl(workload: str, world: dict, out: str, tuned: bool = False) -> dict | None:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(world["policy"])
    if workload == "ppo":
        return _run_trl_ppo(world, out, tokenizer, tuned)
    if workload == "grpo":
        return _run_trl_grpo(world, out, tokenizer, tuned)
    data = load_dataset("json", data_files=world[workload], split="train")
    if workload == "sft":
        from trl import SFTConfig, SFTTrainer

        model = AutoModelForCausalLM.from_pretrained(world["policy"])
        # padding-free concatenates a batch's rows into one sequence (position ids restart at each row; the
        # attention mask transformers builds from them keeps rows apart); TRL then refuses max_length, which
        # truncates nothing here (the world's rows are at most 400 tokens)
        shape = dict(padding_free=True, max_length=None) if tuned else dict(max_length=MAX_LENGTH)
        trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=data,
                             args=SFTConfig(**shape, **_trl_common(workload, out, tuned)))
    elif workload == "rm":
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(world["policy"], num_labels=1)
        trainer = RewardTrainer(model=model, processing_class=tokenizer, train_dataset=data,
                                args=RewardConfig(max_length=MAX_LENGTH, **_trl_common(workload, out, tuned)))
    else:
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(world["policy"])
        trainer = DPOTrainer(model=model, processing_class=tokenizer, train_dataset=data,
                             args=DPOConfig(max_length=MAX_LENGTH, beta=BETA, precompute_ref_log_probs=tuned,
                                            **_trl_common(workload, out, tuned)))
    trainer.train()
    trainer.save_model(out)
    return _trl_checks(trainer)


def _run_trl_ppo(world: dict, out: str, tokenizer, tuned: bool) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.unk_token is not None:
        # TRL 1.12's PPO finds padding by token id; SmolLM2 pads with its EOS (<|im_end|>), which also closes the
        # user turn in every prompt, so pad with its <|endoftext|> instead (same tensor shapes, prompts intact)
        tokenizer.pad_token = tokenizer.unk_token
    prompts = load_dataset("json", data_files=world["ppo"], split="train")
    prompts = prompts.map(lambda row: {"input_ids": tokenizer(row["prompt"])["input_ids"]},
                          remove_columns=prompts.column_names)
    policy = AutoModelForCausalLM.from_pretrained(world["policy"])
    ref_policy = AutoModelForCausalLM.from_pretrained(world["policy"])
    reward_model = AutoModelForSequenceClassification.from_pretrained(world["reward"], num_labels=1)
    value_model = AutoModelForSequenceClassification.from_pretrained(world["reward"], num_labels=1)
    args = PPOConfig(num_ppo_epochs=PPO_EPOCHS, num_mini_batches=1, response_length=RESPONSE_LENGTH,
                     temperature=TEMPERATURE, total_episodes=len(prompts), local_rollout_forward_batch_size=BATCH,
                     num_sample_generations=0, stop_token=None, **_trl_common("ppo", out, tuned))
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, value_model=value_model, train_dataset=prompts)
    trainer.train()
    trainer.save_model(out)
    return {"gradient_checkpointing": bool(args.gradient_checkpointing)}


def _run_trl_grpo(world: dict, out: str, tokenizer, tuned: bool) -> dict:
    """TRL 1.16's GRPOTrainer with tunelab's batch shape. TRL counts completions, not prompts: an optimizer
    step is per_device_train_batch_size x gradient_accumulation_steps completions (GRPO_MINIBATCH), and one
    generation batch, steps_per_generation x per_device_train_batch_size completions, is BATCH prompts x
    num_generations; it is reused for num_iterations passes before the next one is generated."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    import grpo_reward

    prompts = load_dataset("json", data_files=world["ppo"], split="train")
    lengths: list[int] = []

    def reward(prompts, completions, completion_ids, **columns):  # the shared reward; records the token counts
        lengths.extend(len(ids) for ids in completion_ids)
        return grpo_reward.reward(prompts, completions, **columns)

    reward.__name__ = "grpo_reward"
    common = _trl_common("grpo", out, tuned)
    micro = common.pop("per_device_train_batch_size")
    common.pop("gradient_accumulation_steps")
    args = GRPOConfig(per_device_train_batch_size=micro, gradient_accumulation_steps=GRPO_MINIBATCH // micro,
                      num_generations=GRPO_GENERATIONS, steps_per_generation=BATCH * GRPO_GENERATIONS // micro,
                      num_iterations=GRPO_PASSES, beta=GRPO_BETA, epsilon=0.2, loss_type="dapo",
                      scale_rewards="group", max_completion_length=RESPONSE_LENGTH,
                      generation_kwargs={"min_new_tokens": RESPONSE_LENGTH}, temperature=TEMPERATURE,
                      log_completions=False, **common)
    model = AutoModelForCausalLM.from_pretrained(world["policy"])
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=prompts,
                          processing_class=tokenizer)
    trainer.train()
    trainer.save_model(out)
    steps = trainer.state.global_step
    return {"iterations": len(lengths) // (BATCH * GRPO_GENERATIONS), "optimizer_steps": steps,
            "response_tokens_mean": sum(lengths) / max(len(lengths), 1), "response_tokens_min": min(lengths, default=0),
            "response_tokens_max": max(lengths, default=0), "generation_batch_size": args.generation_batch_size,
            "gradient_checkpointing": bool(args.gradient_checkpointing)}


def peak_rss_mib() -> float:
    """High-water resident set size of this process since it started (exec), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the closest figure


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far: against `seconds` x threads it shows whether the run had
    its cores to itself (on a shared machine the wall time stretches, the CPU time much less)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    tool, workload, world_dir, result = sys.argv[1:5]
    if tool not in ("tunelab", "trl", "trl-tuned"):
        raise SystemExit(f"unknown tool {tool!r}: expected tunelab, trl or trl-tuned")
    import torch

    threads = int(os.environ.get("BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    world = json.loads((Path(world_dir) / "paths.json").read_text())
    import transformers  # noqa: F401  (imports are outside the timed span)

    if tool != "tunelab":
        import datasets  # noqa: F401
        import trl  # noqa: F401
    else:
        import tunelab.cli  # noqa: F401
    cuda = device() == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise SystemExit("BENCH_DEVICE=cuda but torch sees no CUDA device")
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix=f"bench-{tool}-{workload}-") as tmp:
        out = str(Path(tmp) / "run")
        before = peak_rss_mib()
        cpu_before = _cpu_seconds()
        started = time.perf_counter()
        if tool == "tunelab":
            checks = run_tunelab(workload, world, out) or {}
        else:
            checks = run_trl(workload, world, out, tuned=tool == "trl-tuned") or {}
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        cpu = _cpu_seconds() - cpu_before
    if workload == "grpo":
        import grpo_reward

        checks["responses_scored"] = grpo_reward.SCORED[0]
    peak = peak_rss_mib()
    gpu = ({"peak_gpu_mib": torch.cuda.max_memory_reserved() / 2 ** 20,
            "peak_gpu_allocated_mib": torch.cuda.max_memory_allocated() / 2 ** 20,
            "gpu_name": torch.cuda.get_device_name(0)} if cuda else {})
    version = __import__("tunelab" if tool == "tunelab" else "trl").__version__
    Path(result).write_text(json.dumps({"tool": tool, "workload": workload, "seconds": seconds,
                                        "cpu_seconds": cpu, "peak_rss_mib": peak, "rss_after_imports_mib": before,
                                        "threads": threads, "version": version, "precision": precision(),
                                        "torch_threads": torch.get_num_threads(), "checks": checks,
                                        "device": device(), **gpu}))


if __name__ == "__main__":
    main()

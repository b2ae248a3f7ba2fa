"""Recipe configuration: pydantic models, YAML files and `key=value` overrides.

A config is built in layers, later ones winning: the defaults below, an optional YAML file, the
command-line flags (`--lr`, `--batch-size`, ...) and finally `key=value` overrides such as
`lora.r=16` or `train.lr=2e-4`. Unknown keys are errors with a "did you mean" hint, and every
error names where the bad value came from.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message says which, where and what was expected."""


TRACKER_NAMES = ("tensorboard", "wandb", "mlflow", "trackio")


def tracker_names(value: Any) -> list[str]:
    """`report_to` as a list of tracker names: a list, or a string, of comma-separated names (`--report-to a,b
    --report-to c`); `none` means no tracker. An unknown name is an error listing the known ones."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise ValueError("must be a list of tracker names or a comma-separated string")
    names = []
    for name in (part.strip().lower() for item in items for part in item.split(",")):
        if name and name not in names:
            names.append(name)
    for name in names:
        if name not in (*TRACKER_NAMES, "none"):
            close = difflib.get_close_matches(name, TRACKER_NAMES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown tracker '{name}'{hint}; known trackers: {', '.join(TRACKER_NAMES)}, none")
    if "none" in names and len(names) > 1:
        raise ValueError(f"'none' cannot be combined with other trackers (got {', '.join(names)})")
    return [name for name in names if name != "none"]


class Section(BaseModel):
    """Base of every config section: unknown keys and non-finite numbers are rejected, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True,
                              allow_inf_nan=False)  # an infinite lr or NaN coefficient is never meant


Format = Literal["auto", "text", "prompt_completion", "alpaca", "messages", "sharegpt", "kto", "preference",
                 "prompt"]
# the column names the row formats read; data.columns maps a source's own names onto them
CANONICAL_COLUMNS = ("text", "prompt", "completion", "instruction", "input", "output", "system", "history",
                     "messages", "conversations", "tools", "chosen", "rejected", "margin", "label", "kto_tag")


def _check_columns(value: dict[str, str]) -> dict[str, str]:
    for name, column in value.items():
        if name not in CANONICAL_COLUMNS:
            hint = difflib.get_close_matches(str(name), CANONICAL_COLUMNS, n=1)
            raise ValueError(f"'{name}' is not a column name tunelab reads" + (
                f" (did you mean '{hint[0]}'?)" if hint else f"; expected one of {', '.join(CANONICAL_COLUMNS)}"))
        if not isinstance(column, str) or not column:
            raise ValueError(f"the column mapped to '{name}' must be a column name, got {column!r}")
    return value


COLUMNS_HELP = ("column mapping: a canonical name -> this data's column, e.g. {prompt: question, completion: "
                "answer}; canonical names: " + ", ".join(CANONICAL_COLUMNS))


class ModelConfig(Section):
    name_or_path: str = Field("", description="model directory or hub name (--model)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the weights are loaded in")
    trust_remote_code: bool = Field(False, description="allow code shipped with the model to run")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass to save memory")


class DataSource(Section):
    path: str = Field(description="jsonl/json/csv/parquet file, a saved `datasets` directory, or a hub name")
    weight: float = Field(1.0, gt=0, description="rows used per epoch = weight x rows in the source")
    format: Format = Field("auto", description="row format; auto detects it from the columns")
    split: str = Field("train", description="split to read from a hub dataset or a saved DatasetDict")
    columns: dict[str, str] = Field(default_factory=dict, description=COLUMNS_HELP + " (over data.columns)")

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_columns(value)


class DataConfig(Section):
    sources: list[DataSource] = Field(default_factory=list, description="datasets to mix (--data)")
    eval_sources: list[DataSource] = Field(
        default_factory=list, description="held-out data (--eval-data): evaluated on whole, and then no rows are "
        "held out of the training sources (eval_fraction is not used)")
    columns: dict[str, str] = Field(default_factory=dict, description=COLUMNS_HELP + " (every source)")
    max_length: int = Field(512, ge=8, description="longest tokenized row, in tokens")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="what to do with rows longer than max_length")
    train_on_prompt: bool = Field(
        False, description="also train on prompt tokens (off: loss on the completion only)")
    eval_fraction: float = Field(
        0.05, ge=0, lt=1, description="share of each source held out for evaluation")
    eval_max_rows: int = Field(256, ge=0, description="cap on held-out rows per source")
    chat_template: str | None = Field(
        None, description="Jinja chat template for `messages` rows, or 'chatml'; default: the tokenizer's")
    cache_dir: str | None = Field(
        "auto", description="tokenized cache of sft, rm, dpo and kto rows between runs, keyed by the data's content, "
        "the tokenizer and these settings (auto: $TUNELAB_CACHE_DIR, else ~/.cache/tunelab/tokenized; null: off)")

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_columns(value)


class LoraConfig(Section):
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: str | list[str] = Field(
        "all-linear", description="module names to adapt, or 'all-linear' (the default; for an encoder-decoder "
        "left unset, its attention projections: q,v on T5, q_proj,v_proj on BART)")


class TrainConfig(Section):
    lr: float | None = Field(None, gt=0, description="peak learning rate (null: the recipe's default for the PEFT "
                             "method)")
    epochs: float = Field(1.0, gt=0, description="passes over the training data")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(8, ge=1, description="examples per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    schedule: Literal["linear", "cosine", "constant"] = Field("cosine", description="learning-rate decay")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="share of steps spent warming up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip gradients to this norm (null: off)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 runs the forward pass under autocast (weights and optimizer stay fp32); auto: bf16 "
        "where the hardware computes it natively (CUDA with bf16, CPUs with AVX-512 BF16 or AMX), fp32 elsewhere")
    seed: int = Field(0, description="seed for initialisation, data order and dropout")
    group_by_length: bool = Field(True, description="batch rows of similar length together")
    micro_batch_tokens: int | Literal["auto"] | None = Field(
        "auto", description="split each batch into micro-batches of at most this many padded tokens (rows x "
        "longest row); the gradient is the same, with less padding and memory (auto: sized from the model so "
        "that a micro-batch's activations take about 160 MiB on a CPU, 1 GiB on an accelerator; null: off)")
    log_every: int = Field(10, ge=1, description="write metrics every N steps")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only at the end)")
    save_every: int = Field(
        0, ge=0, description="checkpoint every N steps, and once more at the end (0: no checkpoints, only final/; "
        "a run killed before final/ then cannot be resumed, while Ctrl-C or SIGTERM still write one); each "
        "checkpoint's model/ loads like final/")
    keep_last: int = Field(2, ge=1, description="checkpoints kept on disk")
    logprob_chunk: int = Field(2048, ge=1, description="tokens per LM-head chunk when computing log-probs")
    report: bool = Field(True, description="write plots/ and report.md into the run directory at the end")
    report_to: list[Literal[TRACKER_NAMES]] = Field(
        default_factory=list, description="experiment trackers that also receive every metric of metrics.jsonl, "
        "the config and RL samples: tensorboard, wandb, mlflow, trackio, as a list or comma-separated "
        "(--report-to); none or []: none (metrics.jsonl and plots only)")

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_names(cls, value):
        return tracker_names(value)

    @field_validator("micro_batch_tokens")
    @classmethod
    def _positive_budget(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("must be a positive number of tokens, 'auto' or null")
        return value

    def micro_batch_budget(self, device_type: str, token_bytes: int) -> int | None:
        """The micro-batch token budget in force on a device of this type ('cpu', 'cuda', ...).

        `auto` sizes micro-batches so that their stored activations (`token_bytes` per token) take about
        160 MiB on a CPU or 1 GiB on an accelerator, within [512, 16384] tokens: small models, whose speed
        is bound by per-pass overhead, run whole batches; large ones are split.
        """
        if self.micro_batch_tokens != "auto":
            return self.micro_batch_tokens
        allowance = (160 if device_type == "cpu" else 1024) * 2 ** 20
        return min(16384, max(512, allowance // max(token_bytes, 1)))


class QuantizationConfig(Section):
    bits: Literal[4, 8] = Field(4, description="QLoRA: weight precision of the frozen base")
    type: Literal["nf4", "fp4"] = Field("nf4", description="QLoRA: 4-bit data type (NormalFloat4 or FP4)")
    double_quant: bool = Field(True, description="QLoRA: also quantize the quantization constants")
    compute_dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="QLoRA: dtype of the matmuls")


class PromptTuningConfig(Section):
    num_virtual_tokens: int = Field(16, ge=1, description="prompt tuning: soft-prompt length in tokens")
    init_text: str | None = Field(
        None, description="prompt tuning: initialise the soft prompt from this text's embeddings (else random)")


class RecipeConfig(Section):
    """Sections every training recipe has."""

    # what a shared key means in this recipe, where it differs from the shared description (shown in --help)
    key_help: ClassVar[dict[str, str]] = {}

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    peft: Literal["lora", "qlora", "prompt", "none"] = Field(
        "lora", description="parameters to train: LoRA adapters, LoRA on a quantized base (qlora), a soft "
        "prompt (prompt), or all (none)")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    prompt_tuning: PromptTuningConfig = Field(default_factory=PromptTuningConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: str = Field("", description="run directory (--output)")

    def resolved_lr(self) -> float:
        """The learning rate in force: the configured one, or the default for the chosen PEFT method."""
        if self.train.lr is not None:
            return self.train.lr
        return {"none": 2e-5, "prompt": 3e-2}.get(self.peft, 2e-4)

    def quantization_in_force(self) -> QuantizationConfig | None:
        """The quantization of the base weights: only with peft=qlora."""
        return self.quantization if self.peft == "qlora" else None


class SFTConfig(RecipeConfig):
    """Supervised fine-tuning."""


class RewardConfig(Section):
    center_coef: float = Field(
        0.0, ge=0, description="reward centering: adds coef * mean((r_chosen + r_rejected)^2) (0: off)")
    use_margin: bool = Field(True, description="subtract the rows' `margin` column inside the sigmoid")
    share_prefix: bool = Field(
        True, description="score a pair's two sides as one row that holds their common prefix (the prompt) once, "
        "with an attention mask that keeps the sides apart: the same scores for less work (decoder models with "
        "sdpa or eager attention; not with prompt tuning, ALiBi or sliding-window layers; false: one padded row "
        "per side)")


class RMConfig(RecipeConfig):
    """Reward modeling with a Bradley-Terry loss."""

    reward: RewardConfig = Field(default_factory=RewardConfig)


REFERENCE_FREE_LOSSES = ("simpo", "orpo")  # preference losses that need no reference model


class DPOSection(Section):
    beta: float | None = Field(
        None, gt=0, description="sigmoid/robust/ipo/hinge: strength of the pull toward the reference (higher: "
        "stay closer; default 0.1); simpo: scale of the length-normalised rewards (default 2.0); orpo: weight "
        "lambda of the odds-ratio term (default 0.1); null: that loss's default")
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"] = Field(
        "sigmoid", description="DPO loss variant; simpo and orpo are reference-free (no reference model at all)")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="assumed label-noise rate (sigmoid: conservative DPO; robust)")
    gamma: float = Field(
        0.5, ge=0, description="simpo: target reward margin gamma, in the units of the beta-scaled rewards "
        "(TRL's simpo_gamma)")
    sft_weight: float = Field(
        0.0, ge=0, description="weight of an extra per-token NLL term on the chosen response (orpo has its own, "
        "weight 1)")
    precompute_ref: bool = Field(
        False, description="compute reference log-probs once before training, then free the reference")
    share_prefix: bool = Field(
        True, description="run a pair's two sides as one row that holds their common prefix (the prompt) once, "
        "with an attention mask that keeps the sides apart: the same log-probs for less work (decoder models with "
        "sdpa or eager attention; not with prompt tuning, ALiBi or sliding-window layers; false: one padded row "
        "per side)")

    @property
    def reference_free(self) -> bool:
        return self.loss in REFERENCE_FREE_LOSSES

    def resolved_beta(self) -> float:
        """The beta in force: the configured one, or the chosen loss's default."""
        if self.beta is not None:
            return self.beta
        return 2.0 if self.loss == "simpo" else 0.1


class DPOConfig(RecipeConfig):
    """Direct preference optimization."""

    ref: str | None = Field(None, description="reference model (--ref); default: the starting model")
    dpo: DPOSection = Field(default_factory=DPOSection)

    def resolved_lr(self) -> float:
        if self.train.lr is not None:
            return self.train.lr
        return 5e-5 if self.peft != "none" else 5e-7


class KTOSection(Section):
    beta: float = Field(0.1, gt=0, description="scale of the implicit reward beta * (logp - ref_logp) inside "
                        "the sigmoid (higher: stay closer to the reference)")
    desirable_weight: float = Field(1.0, gt=0, description="weight lambda_D of the loss on desirable rows")
    undesirable_weight: float = Field(
        1.0, gt=0, description="weight lambda_U of the loss on undesirable rows (KTO suggests lambda_D * "
        "desirable rows / (lambda_U * undesirable rows) between 1 and 4/3)")


class KTOConfig(RecipeConfig):
    """KTO: learning from unpaired desirable/undesirable feedback."""

    ref: str | None = Field(None, description="reference model (--ref); default: the starting model")
    kto: KTOSection = Field(default_factory=KTOSection)

    def resolved_lr(self) -> float:
        if self.train.lr is not None:
            return self.train.lr
        return 5e-5 if self.peft != "none" else 5e-7


class GenerationConfig(Section):
    temperature: float = Field(1.0, ge=0, description="sampling temperature (0: greedy)")
    top_k: int = Field(0, ge=0, description="sample from the k most likely tokens (0: all)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (1: all)")
    repetition_penalty: float = Field(1.0, gt=0, description="penalty on tokens already present (1: none)")
    min_new_tokens: int = Field(1, ge=0, description="shortest response")
    max_new_tokens: int = Field(48, ge=1, description="longest response (upper end of the length sampler)")
    length_sampler_min: int | None = Field(
        None, ge=1, description="if set, each batch's max length is drawn uniformly from [this, max_new_tokens]")


class PPORewardConfig(Section):
    source: str = Field("", description="reward: a `tunelab rm` run/model dir, pipeline:MODEL, or module:function "
                        "(--reward)")
    label: str | None = Field(None, description="pipeline label whose score is the reward (e.g. POSITIVE)")
    missing_eos_penalty: float | None = Field(
        None, description="added to the score of responses that never emit EOS (e.g. -1.0)")
    clip: float | None = Field(None, gt=0, description="clip scores to [-clip, clip]")
    normalize: bool = Field(False, description="whiten scores over each rollout batch")
    batch_size: int = Field(16, ge=1, description="sequences per reward-model forward pass")


class PPOSection(Section):
    epochs: int = Field(4, ge=1, description="passes over each rollout batch")
    minibatch_size: int = Field(8, ge=1, description="rollouts per optimizer step")
    clip_range: float = Field(0.2, gt=0, description="policy ratio clip epsilon")
    value_clip: float = Field(0.2, gt=0, description="value clip epsilon")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    entropy_coef: float = Field(0.0, ge=0, description="weight of the entropy bonus")
    gamma: float = Field(1.0, gt=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    kl_coef: float = Field(0.05, ge=0, description="KL penalty coefficient (initial value if adaptive)")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="per-token KL estimator in the reward")
    adaptive_kl: bool = Field(False, description="adapt kl_coef toward kl_target (Ziegler et al., 2019)")
    kl_target: float = Field(6.0, gt=0, description="target KL for the adaptive controller")
    kl_horizon: int = Field(10000, ge=1, description="horizon of the adaptive controller")
    target_kl: float | None = Field(
        None, gt=0, description="stop an iteration's epochs early when approx KL exceeds this")
    whiten_advantages: bool = Field(True, description="whiten advantages over the batch")
    sample_every: int = Field(10, ge=0, description="log prompt/response/score samples every N iterations (0: off)")
    critic: str | None = Field(
        None, description="separate critic initialised from this reward model (run or model dir); default: a "
        "value head on the policy trunk")


ONLINE_KEY_HELP = {
    "train.max_steps": "iterations to run (each: sample responses for train.batch_size prompts, score them, then "
    "{updates}) (null: train.epochs passes over the prompts)",
    "train.batch_size": "prompts per iteration, a total over processes{each}",
    "train.epochs": "passes over the prompts, when train.max_steps is not set",
    "train.grad_accum": "not used: each optimizer step takes {minibatch}",
}


class PPOConfig(RecipeConfig):
    """RLHF with PPO: train.max_steps = iterations, train.batch_size = prompts per rollout."""

    key_help: ClassVar[dict[str, str]] = {key: text.format(
        updates="ppo.epochs passes of clipped updates over minibatches of ppo.minibatch_size rollouts", each="",
        minibatch="ppo.minibatch_size rollouts") for key, text in ONLINE_KEY_HELP.items()}

    reward: PPORewardConfig = Field(default_factory=PPORewardConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    ppo: PPOSection = Field(default_factory=PPOSection)

    def resolved_lr(self) -> float:
        if self.train.lr is not None:
            return self.train.lr
        return 1e-4 if self.peft != "none" else 1e-5


class GroupRLSection(Section):
    """Critic-free RL with group baselines: what GRPO and RLOO share (their defaults differ)."""

    num_generations: int = Field(4, ge=2, description="responses sampled per prompt (K): one group per prompt")
    epochs: int = Field(1, ge=1, description="passes over each rollout batch (1: on-policy)")
    minibatch_size: int | None = Field(
        None, ge=1, description="responses per optimizer step, total over processes (null: the whole rollout "
        "batch, one update per pass)")
    clip_range: float = Field(0.2, gt=0, description="policy ratio clip epsilon")
    kl: Literal["loss", "reward", "off"] = Field(
        "loss", description="KL to the frozen reference: a per-token k3 term in the loss (GRPO's form), "
        "folded into each response's reward as -kl_coef * summed k1 (RLOO's form), or off (no reference loaded)")
    kl_coef: float = Field(0.04, ge=0, description="KL coefficient (beta)")
    scale_rewards: bool = Field(
        True, description="GRPO: divide the group-centred rewards by the group's std (false: Dr. GRPO's "
        "unscaled advantages); RLOO never scales")
    loss_norm: Literal["sequence", "token"] = Field(
        "sequence", description="policy loss: mean over each response's tokens, then over responses "
        "(sequence), or one mean over all response tokens of the minibatch (token, Dr. GRPO)")
    sample_every: int = Field(10, ge=0, description="log prompt/response/score samples every N iterations (0: off)")


class GRPOSection(GroupRLSection):
    advantage: Literal["grpo", "rloo"] = Field(
        "grpo", description="group baseline: (r - group mean) / group std (grpo) or leave-one-out (rloo)")


class RLOOSection(GroupRLSection):
    advantage: Literal["grpo", "rloo"] = Field(
        "rloo", description="group baseline: leave-one-out mean of the other responses (rloo) or grpo's")
    kl: Literal["loss", "reward", "off"] = Field(
        "reward", description="KL to the frozen reference: folded into each response's reward as -kl_coef * "
        "summed k1 (RLOO's form), a per-token k3 term in the loss (GRPO's form), or off (no reference loaded)")
    kl_coef: float = Field(0.05, ge=0, description="KL coefficient (beta)")


class GRPOConfig(RecipeConfig):
    """GRPO: train.max_steps = iterations, train.batch_size = prompts per rollout (each sampled K times)."""

    key_help: ClassVar[dict[str, str]] = {key: text.format(
        updates="rl.epochs passes of clipped updates over minibatches of rl.minibatch_size responses",
        each=", each sampled rl.num_generations times", minibatch="rl.minibatch_size responses (null: the whole "
        "rollout batch)") for key, text in ONLINE_KEY_HELP.items()}

    reward: PPORewardConfig = Field(default_factory=PPORewardConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    rl: GRPOSection = Field(default_factory=GRPOSection)

    def resolved_lr(self) -> float:
        if self.train.lr is not None:
            return self.train.lr
        return 1e-4 if self.peft != "none" else 1e-5


class RLOOConfig(GRPOConfig):
    """RLOO: REINFORCE with a leave-one-out baseline over each prompt's K responses."""

    rl: RLOOSection = Field(default_factory=RLOOSection)


class ContrastiveSection(Section):
    pooling: Literal["auto", "mean", "cls", "last"] = Field(
        "auto", description="how token states become one embedding: mean over real tokens, the [CLS] token, "
        "or the last real token (auto: the model's own 1_Pooling/config.json, else mean for an encoder and "
        "last for a causal LM)")
    normalize: bool = Field(True, description="L2-normalise embeddings (similarity = cosine)")
    temperature: float = Field(0.05, gt=0, description="InfoNCE temperature: logits = cos / temperature")
    learnable_scale: bool = Field(
        False, description="learn the logit scale, starting at 1 / temperature (capped at 100)")
    symmetric: bool = Field(False, description="also let each positive retrieve its anchor; the loss is the "
                            "mean of both directions")
    grad_cache_chunk: int | None = Field(
        None, ge=1, description="gradient caching: embed the batch without gradients, then re-run it in "
        "chunks of this many texts with the loss gradient (same gradient, activations of one chunk; null: off)")
    recall_at: tuple[int, ...] = Field((5, 10), description="k of the held-out recall@k figures, e.g. [5, 10] "
                                       "(accuracy@1 and MRR are always reported)")

    @field_validator("recall_at")
    @classmethod
    def _positive_k(cls, value):
        if any(k < 1 for k in value):
            raise ValueError("every k must be at least 1")
        return value
    eval_batch_size: int = Field(32, ge=1, description="texts per forward pass in held-out retrieval")


class ContrastiveConfig(RecipeConfig):
    """Contrastive fine-tuning of an embedding model (an encoder or a causal LM) on text pairs."""

    contrastive: ContrastiveSection = Field(default_factory=ContrastiveSection)


# ---------------------------------------------------------------------------------------------
# Building a config from layers


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class an annotation refers to (directly or as list items), if any."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _check_keys(cls: type[BaseModel], values: Any, prefix: str, origins: dict[str, str]) -> None:
    if not isinstance(values, dict):
        return
    fields = cls.model_fields
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            known = [f"{prefix}{name}" for name in fields]
            # compare the last part only: a shared "train." prefix would make anything look close
            hint = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6) or sorted(
                (name for name in fields if str(key).startswith(name) or name.startswith(str(key))), key=len)[-1:]
            where = _origin(dotted, origins)
            msg = f"unknown config key '{dotted}'{where}"
            msg += f" (did you mean '{prefix}{hint[0]}'?)" if hint else f"; known keys here: {', '.join(known)}"
            raise ConfigError(msg)
        sub = _section_type(fields[key].annotation)
        if sub is None:
            continue
        if isinstance(value, list):
            for i, item in enumerate(value):
                _check_keys(sub, item, f"{dotted}.{i}.", origins)
        else:
            _check_keys(sub, value, f"{dotted}.", origins)


def _origin(dotted: str, origins: dict[str, str]) -> str:
    """Where a key was set: itself or its nearest parent, else the first of its children."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        src = origins.get(".".join(parts[:n]))
        if src:
            return f" ({src})"
    for key, src in origins.items():
        if key.startswith(dotted + "."):
            return f" ({src})"
    return ""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested tree; a numeric part indexes into a list (`data.sources.0.weight`)."""
    node: Any = tree
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"config key '{dotted}': '{part}' is not an index of the "
                                  f"{len(node)}-item list '{'.'.join(parts[:depth])}'")
            part = int(part)
            if last:
                node[part] = value
            else:
                if not isinstance(node[part], (dict, list)):
                    node[part] = {}
                node = node[part]
            continue
        if last:
            node[part] = value
        else:
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 1}}` -> `{"train.lr": 1}` (lists and other values kept whole)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """Split `key=value`; the value is read as YAML (`3`, `true`, `[a, b]`, `{path: x}`).

    Numbers that YAML reads as strings (`2e-4`) are converted by the field's type on validation, and
    numbers given for string fields are kept as strings.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form key=value (for example train.lr=2e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def build_config(cls: type[BaseModel], *, yaml_path: str | None = None, flags: dict[str, Any] | None = None,
                 overrides: list[str] | None = None, settings: dict[str, tuple[Any, str]] | None = None) -> Any:
    """Build a config of type `cls` from defaults, a YAML file, CLI flag values and `key=value` overrides.

    `flags` maps dotted keys to values; `None` values are skipped (the flag was not given). `settings` (the
    Python API's arguments) maps dotted keys to `(value, where it was set)`, applied after the flags and before
    the overrides, `None` included (it means null). Raises ConfigError naming the key, its source and what
    was expected.
    """
    tree: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if yaml_path:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {yaml_path}")
        from tunelab.data.load import DataError, read_text

        try:
            loaded = yaml.safe_load(read_text(path)) or {}
        except DataError as exc:  # not UTF-8: the line and column are named
            raise ConfigError(f"config file {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {yaml_path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {yaml_path} must hold a mapping of keys, got {type(loaded).__name__}")
        tree = loaded
        for key in flatten(loaded):
            origins[key] = f"in {yaml_path}"
    for key, value in (flags or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
            origins[key] = f"from flag for {key}"
    for key, (value, where) in (settings or {}).items():
        _set_dotted(tree, key, value)
        origins[key] = where
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
        origins[key] = f"from override '{text}'"
    _check_keys(cls, tree, "", origins)
    try:
        return cls.model_validate(tree)
    except ValidationError as exc:
        lines: dict[str, list[str]] = {}
        for err in exc.errors():
            dotted = _field_path(cls, err["loc"])
            got = err.get("input")
            where = f"config value '{dotted}'{_origin(dotted, origins)}"
            detail = f"{err['msg']} (got {got!r})"
            if detail not in lines.setdefault(where, []):
                lines[where].append(detail)
        raise ConfigError("\n".join(f"{where}: {'; or '.join(details)}" for where, details in lines.items())) from None


def _field_path(cls: type[BaseModel] | None, loc: tuple) -> str:
    """The dotted key of an error location, without pydantic's union-member parts such as 'list[str]'."""
    parts = []
    for part in loc:
        if isinstance(part, int):
            parts.append(str(part))
        elif cls is not None and part in cls.model_fields:
            parts.append(part)
            cls = _section_type(cls.model_fields[part].annotation)
        else:
            break
    return ".".join(parts)


def config_to_yaml(config: BaseModel) -> str:
    """The fully resolved config as YAML text."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def lr_defaults(cls: type[RecipeConfig]) -> dict[str, float]:
    """The learning rate a recipe uses when train.lr is not set, for each PEFT method."""
    methods = typing.get_args(RecipeConfig.model_fields["peft"].annotation)
    return {method: cls(peft=method).resolved_lr() for method in methods}


def lr_default_text(cls: type[RecipeConfig]) -> str:
    """`5e-05 with lora, qlora or prompt; 5e-07 with none`: the recipe's default learning rates, in words."""
    by_value: dict[float, list[str]] = {}
    for method, value in lr_defaults(cls).items():
        by_value.setdefault(value, []).append(method)
    return "; ".join(f"{value:g} with peft={' or '.join(methods)}" for value, methods in by_value.items())


def describe_fields(cls: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every leaf field: the `key=value` reference in --help.

    The items of a list of sections (data.sources) are described as `data.sources.N.KEY`. A recipe's own
    meaning of a shared key (`key_help`) and its default learning rates replace the shared descriptions."""
    rows = []
    for name, field in cls.model_fields.items():
        sub = _section_type(field.annotation)
        if sub is not None and typing.get_origin(field.annotation) is not list:
            rows.extend(describe_fields(sub, f"{prefix}{name}."))
            continue
        default = field.get_default(call_default_factory=True)
        rows.append((f"{prefix}{name}", repr(default) if not isinstance(default, list) else "[]",
                     field.description or ""))
        if sub is not None:  # a list of sections: each item's keys
            for key, item_default, text in describe_fields(sub, f"{prefix}{name}.N."):
                required = sub.model_fields[key.rsplit(".", 1)[1]].is_required()
                rows.append((key, "required" if required else item_default, text))
    if not prefix and isinstance(cls, type) and issubclass(cls, RecipeConfig):
        notes = {**cls.key_help, "train.lr": f"peak learning rate (null: {lr_default_text(cls)})"}
        rows = [(key, default, notes.get(key, text)) for key, default, text in rows]
    return rows

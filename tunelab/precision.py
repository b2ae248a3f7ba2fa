"""Training precision: fp32, or bf16 autocast where the hardware computes in bf16 quickly.

`train.precision=auto` (the default) picks bf16 on a CUDA device that supports it and on CPUs with
AVX-512 BF16 or AMX instructions, whose matrix units compute bf16 products natively; elsewhere (AVX2
CPUs, older GPUs, Apple's MPS) bf16 is emulated or partial and fp32 is both faster and exact. The
weights, gradients and optimizer states stay fp32 in every case: autocast only runs the matrix products
of the forward (and so of the backward) in bf16. The environment variable TUNELAB_PRECISION (fp32 or bf16)
decides what auto means on a machine, for every run started there (a cluster's job script, a test suite
that compares runs bit for bit).
"""

from __future__ import annotations

import contextlib
import os

import torch

from tunelab.config import ConfigError


def fast_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` computes bf16 natively, and a few words saying why (or why not)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{torch.cuda.get_device_name(device)} supports bf16"
        return False, f"{torch.cuda.get_device_name(device)} has no native bf16"
    if device.type == "cpu":
        if torch.cpu._is_amx_tile_supported():
            return True, "this CPU has AMX"
        if torch.cpu._is_avx512_bf16_supported():
            return True, "this CPU has AVX-512 BF16"
        return False, "this CPU has neither AVX-512 BF16 nor AMX"
    return False, f"bf16 is not fast on {device.type}"


def resolve(setting: str, device: torch.device) -> tuple[str, str]:
    """The precision a run uses ("fp32" or "bf16") for `train.precision` = auto, fp32 or bf16, and the line
    that says so at start."""
    if setting != "auto":
        return setting, f"precision: {setting} (train.precision={setting})"
    forced = os.environ.get("TUNELAB_PRECISION", "").strip().lower()
    if forced:
        if forced not in ("fp32", "bf16"):
            raise ConfigError(f"TUNELAB_PRECISION={forced!r}: expected fp32 or bf16")
        return forced, f"precision: {forced} (TUNELAB_PRECISION={forced}; train.precision=auto)"
    fast, why = fast_bf16(device)
    chosen = "bf16" if fast else "fp32"
    return chosen, f"precision: {chosen} ({why}; train.precision=auto)"


def autocast(precision: str, device: torch.device):
    """The context every forward pass of training and evaluation runs in."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)

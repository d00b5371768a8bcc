"""Where training runs and in which compute dtype."""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch

from tuner.dtypes import short, torch_dtype


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@lru_cache
def cpu_has_bf16() -> bool:
    """bf16 autocast pays off only with native bf16 instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """A dtype name (tuner/dtypes.py) -> the compute dtype. 'auto': bf16 where the hardware runs it natively;
    else fp16 (with the GradScaler) on a GPU such as V100 or T4, whose bf16 is only emulated, and fp32 on a CPU."""
    if short(name) != "auto":
        return torch_dtype(name)
    if device.type == "cuda":  # (the current device: torch.cuda.set_device(local_rank) under torchrun)
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)

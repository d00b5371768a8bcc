"""The one dtype vocabulary: every dtype field of a config (model.dtype, train.dtype) and every
--torch-dtype flag takes these names, and the converter maps XTuner's `torch.float16` & co. onto them.

    auto             the model's own dtype (model.dtype) / bf16 where the hardware runs it natively, else
                     fp16 with a loss scale on a GPU, fp32 on a CPU (train.dtype)
    fp32 float32     bf16 bfloat16     fp16 float16      (the short and the torch names mean the same)
"""

from __future__ import annotations

from typing import Literal

DtypeName = Literal["auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"]
NAMES: tuple[str, ...] = DtypeName.__args__
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def short(name: str) -> str:
    """'bfloat16' -> 'bf16', 'fp16' -> 'fp16', 'auto' -> 'auto'."""
    if name not in NAMES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(NAMES)}")
    return _SHORT.get(name, name)


def torch_dtype(name: str):
    """torch.float32 / bfloat16 / float16 for a name, or the string 'auto' (transformers' own choice)."""
    import torch

    return {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[short(name)]

"""What a run will cost before it starts (memory) and how well it uses the machine (MFU)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tuner.model.adapt import numel
from tuner.paths import cache_root


@dataclass
class MemoryEstimate:
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    def describe(self) -> str:
        gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
        return (f"memory estimate {gib(self.total)} GiB: weights {gib(self.weights)}, grads {gib(self.grads)}, "
                f"optimizer {gib(self.optimizer)}, activations {gib(self.activations)}")


def estimate_memory(model, tokens_per_micro_batch: int, checkpointing: bool, compute_bytes: int,
                    optimizer_bytes_per_param: int = 8) -> MemoryEstimate:
    """Weights as loaded; float32 grads and AdamW moments for trainable parameters; activations
    ~ 34 * hidden * tokens bytes per layer in the compute dtype (about 2 * hidden * tokens with
    checkpointing), plus the logits of the trained positions."""
    weights = sum(numel(p) * p.element_size() for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    config = text_config(model)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    per_layer = (2 if checkpointing else 34) * hidden * tokens_per_micro_batch * compute_bytes / 2
    logits = tokens_per_micro_batch * config.vocab_size * 4 * 2  # float32 logits and their gradient
    return MemoryEstimate(weights, 4 * trainable, optimizer_bytes_per_param * trainable,
                          layers * per_layer + logits)


def available_memory(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    import psutil
    return float(psutil.virtual_memory().available)


def flops_per_token(model, lora: bool) -> float:
    """Training FLOPs per token of the weight matmuls, 2 per multiply-add. Full: forward + both
    backward matmuls = 6 N. LoRA: forward + the input-gradient backward of the frozen weights
    = 4 N (the adapters are negligible). Attention scores are not counted: packed rows attend
    only within each sample, so their cost depends on the samples' lengths, and leaving them
    out keeps MFU a lower bound."""
    # Every matmul weight, the output head included (tied or not); not the embedding lookup,
    # not the adapters. in*out also counts packed 4-bit weights right.
    n = sum(m.in_features * m.out_features for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lora_" not in name)
    return (2 if lora else 3) * 2 * n


def matmul_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The measured matmul peak of this machine in FLOP/s, cached after the first measurement."""
    key = f"{device.type}:{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}:{dtype}"
    path = peak_flops_file()
    cached = _read_peak_flops(path)
    if key in cached:
        return cached[key]
    n = 4096 if device.type == "cuda" else 1024
    own = torch.Generator(device=device).manual_seed(0)  # (not the global stream: a run's dropout masks stay its seed's)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=own)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=own)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - started) / 4)
    peak = 2 * n**3 / best
    try:  # written whole under another name, then renamed: two runs at once never leave half a file
        from tuner.engine.checkpoint import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({**_read_peak_flops(path), key: peak}))
    except OSError:
        pass  # a read-only cache: measured again next time
    return peak


def peak_flops_file() -> Path:
    return cache_root() / "peak_flops.json"


def _read_peak_flops(path: Path) -> dict[str, float]:
    """The cached figures that make sense (positive, finite numbers); anything else is measured again."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, unreadable, truncated, not JSON
        return {}
    if not isinstance(cached, dict):
        return {}
    return {k: float(v) for k, v in cached.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0}


def text_config(model):
    """The language model's config (LLaVA keeps it in text_config)."""
    config = getattr(model, "config", None) or model.get_base_model().config
    return getattr(config, "text_config", None) or config

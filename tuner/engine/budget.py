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


# Matmuls timed for the peak, (rows, inner, columns): small ones suit a CPU's caches, large ones a GPU's. On a
# CPU also tall and wide ones of a model's proportions (tokens x hidden by hidden x out): AMX runs them faster
# than any square (bf16, 2-core Intel Xeon: 4096x512x1024 3,310 and 4096x1024x1024 3,227 GFLOP/s against
# 2,704 at 2048^3), so squares alone made the peak 18% low and MFU that much too high. (fp32: all ~428.)
PEAK_SHAPES = {"cuda": ((4096, 4096, 4096), (8192, 8192, 8192))}
CPU_PEAK_SHAPES = ((512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048), (4096, 1024, 1024), (4096, 512, 1024),
                   (1024, 1024, 4096))
PEAK_REPEATS = 5
PEAK_SECONDS_PER_SHAPE = 0.3  # (after 2 timings a shape stops here: fp32 at 2048 on one CPU thread takes 0.7 s a timing)


@dataclass
class Peak:
    """The matmul peak MFU is measured against, and where it came from (said in the log)."""
    flops: float
    source: str

    def describe(self) -> str:
        return f"{self.flops / 1e9:,.0f} GFLOP/s ({self.source})"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # (the CPU's model: a cache in a home folder shared by several machines keeps each one's figure)
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


def peak_key(device: torch.device, dtype: torch.dtype) -> str:
    """Everything the peak depends on: the device and its model, the dtype, and on a CPU the threads used."""
    threads = "" if device.type == "cuda" else f":{torch.get_num_threads()} threads"
    return f"{device.type}:{_device_name(device)}:{dtype}{threads}"


def measure_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, tuple[tuple[int, int, int], ...]]:
    """The best FLOP/s over several matmul shapes, each the best of up to PEAK_REPEATS timings of 4 matmuls
    (one slow timing, another process taking a core for a moment, does not lower the figure)."""
    shapes = peak_shapes(device)
    own = torch.Generator(device=device).manual_seed(0)  # (not the global stream: a run's dropout masks stay its seed's)
    best_flops = 0.0
    for rows, inner, columns in shapes:
        a = torch.randn(rows, inner, device=device, dtype=dtype, generator=own)
        b = torch.randn(inner, columns, device=device, dtype=dtype, generator=own)
        a @ b  # (warm: the first call picks its kernel)
        best, shape_started = float("inf"), time.perf_counter()
        for repeat in range(PEAK_REPEATS):
            if repeat >= 2 and time.perf_counter() - shape_started > PEAK_SECONDS_PER_SHAPE:
                break
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            for _ in range(4):
                a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, (time.perf_counter() - started) / 4)
        best_flops = max(best_flops, 2 * rows * inner * columns / best)
    return best_flops, shapes


def peak_shapes(device: torch.device) -> tuple[tuple[int, int, int], ...]:
    return PEAK_SHAPES.get(device.type, CPU_PEAK_SHAPES)


def matmul_peak(device: torch.device, dtype: torch.dtype, at_least: float = 0.0) -> Peak:
    """This machine's matmul peak, cached per peak_key after the first measurement. `at_least`: a speed a
    training step reached; a cached peak below it is measured again (and the higher figure kept)."""
    key = peak_key(device, dtype)
    path = peak_flops_file()
    cached = _read_peak_flops(path).get(key)
    if cached and cached.get("shapes") != [list(shape) for shape in peak_shapes(device)]:
        cached = None  # (measured with other shapes: an older tuner's squares read AMX's peak 18% low)
    if cached and cached["flops"] >= at_least:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(cached["measured"])) if cached.get("measured") else "?"
        return Peak(cached["flops"], f"measured {when}, cached in {path}")
    measured, shapes = measure_peak(device, dtype)
    flops = max(measured, at_least)
    how = f"best of up to {PEAK_REPEATS} timings at {'/'.join('x'.join(map(str, shape)) for shape in shapes)}"
    source = (f"measured now, {how}" if at_least <= measured else
              f"a training step's speed: above the {measured / 1e9:,.0f} GFLOP/s measured now, {how}")
    try:  # written whole under another name, then renamed: two runs at once never leave half a file
        from tuner.engine.checkpoint import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"flops": flops, "measured": time.time(), "shapes": [list(shape) for shape in shapes],
                 "threads": torch.get_num_threads()}
        atomic_write_text(path, json.dumps({**_read_peak_flops(path), key: entry}, indent=1))
    except OSError:
        pass  # a read-only cache: measured again next time
    return Peak(flops, source)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The measured matmul peak of this machine in FLOP/s (matmul_peak's figure)."""
    return matmul_peak(device, dtype).flops


def peak_flops_file() -> Path:
    return cache_root() / "peak_flops.json"


def _read_peak_flops(path: Path) -> dict[str, dict]:
    """The cached figures that make sense ({key: {"flops": positive finite, ...}}); anything else (a bare
    number from an older tuner, text, NaN) is measured again."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, unreadable, truncated, not JSON
        return {}
    if not isinstance(cached, dict):
        return {}
    good = {}
    for key, entry in cached.items():
        flops = entry.get("flops") if isinstance(entry, dict) else None
        if isinstance(flops, (int, float)) and not isinstance(flops, bool) and math.isfinite(flops) and flops > 0:
            measured = entry.get("measured")
            good[key] = {**entry, "flops": float(flops),
                         "measured": measured if isinstance(measured, (int, float)) else None}
    return good


def text_config(model):
    """The language model's config (LLaVA keeps it in text_config)."""
    config = getattr(model, "config", None) or model.get_base_model().config
    return getattr(config, "text_config", None) or config

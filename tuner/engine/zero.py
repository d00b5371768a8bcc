"""DeepSpeed ZeRO: presets filled from the tuner config, the engine, and full-tensor weights.

    NPROC_PER_NODE=8 tuner train CFG --deepspeed deepspeed_zero2
    tuner train CFG --deepspeed my_ds_config.json      # micro batch, accumulation, clipping, dtype from CFG

The optimizer states are ZeRO-partitioned, so they are saved with DeepSpeed's own
checkpointing into iter_N_deepspeed/ beside iter_N.pth (which holds full weights, the
schedule, RNG states and the step, and converts like any other checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch

from tuner.config import Config
from tuner.errors import TunerError

# The oldest DeepSpeed whose ZeRO skips an fp32 update with a non-finite gradient norm (train.nan_policy,
# tests/test_engine.py's skipped step): 0.16.0, 0.18.9, 0.19.0, 0.19.5 and 0.19.7 apply it.
OLDEST_DEEPSPEED = (0, 19, 8)

PRESETS = {
    "zero1": {"stage": 1},
    "zero2": {"stage": 2},
    "zero2_offload": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
    "zero3": {"stage": 3},
    "zero3_offload": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}},
}


def ds_config(name_or_path: str, cfg: Config, compute_dtype: torch.dtype, say) -> dict:
    """A preset name (deepspeed_zero2 or zero2 ...) or a JSON file, with every batch, clipping
    and dtype value taken from the tuner config, so the two can never disagree."""
    name = name_or_path.removeprefix("deepspeed_")
    if name in PRESETS:
        config = {"zero_optimization": dict(PRESETS[name])}
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise TunerError(f"--deepspeed {name_or_path!r}: not a preset ({', '.join('deepspeed_' + p for p in PRESETS)})"
                             " nor a JSON file")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise TunerError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    ours = {"train_micro_batch_size_per_gpu": cfg.train.batch_size,
            "gradient_accumulation_steps": cfg.train.accumulative_counts,
            "gradient_clipping": cfg.optim.max_norm or 0.0}
    for key, value in ours.items():
        if config.get(key, "auto") not in ("auto", value):
            say(f"DeepSpeed: {key}={config[key]} in the JSON replaced by {value} from the config")
        config[key] = value
    config.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    config.pop("optimizer", None)  # tuner's optimizer (and schedule) are used
    config.pop("scheduler", None)
    # tuner keeps float32 master weights and computes in autocast; DeepSpeed's bf16 mode would
    # store the weights in bf16, which barely learns at small learning rates.
    config["bf16"] = {"enabled": False}
    config["fp16"] = {"enabled": False}
    config["zero_force_ds_cpu_optimizer"] = False  # offload works with torch's AdamW too
    stage = config.setdefault("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise TunerError(f"--deepspeed {name_or_path}: ZeRO stage {stage}; tuner runs DeepSpeed with stage 1, 2 or 3",
                         hint="stage 0 is plain data parallelism: run without --deepspeed (DDP)")
    # ZeRO computes the gradient norm and skips an update whose norm is not finite, before applying it
    # (what train.nan_policy='skip' needs; a JSON that turns the norm off would apply NaN updates). The key
    # exists from DeepSpeed 0.19.7 on (default on; absent in 0.19.5 and older): written only over a JSON's false.
    if config["zero_optimization"].get("compute_grad_norm") is False:
        say("DeepSpeed: zero_optimization.compute_grad_norm=false in the JSON replaced by true (a non-finite "
            "gradient must be seen before it is applied)")
        config["zero_optimization"]["compute_grad_norm"] = True
    config.setdefault("steps_per_print", 10**9)
    return config


def stage(config: dict) -> int:
    return config["zero_optimization"]["stage"]


def _deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError:
        raise TunerError("--deepspeed needs DeepSpeed", hint="pip install 'tuner[deepspeed]'") from None
    version = tuple(int(p) for p in re.findall(r"\d+", deepspeed.__version__)[:3])
    if version < OLDEST_DEEPSPEED:
        raise TunerError(f"DeepSpeed {deepspeed.__version__} applies an update whose gradient norm is not finite "
                         "(0.19.7 and older, measured); tuner relies on ZeRO skipping it",
                         hint="pip install 'deepspeed>=0.19.8'")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return deepspeed


@contextlib.contextmanager
def partitioned_construction(config: dict):
    """While open, transformers' from_pretrained builds the model under deepspeed.zero.Init (each
    process allocates only its partition of every weight) and loads the checkpoint into the partitions.
    transformers looks for a live HfDeepSpeedConfig; it is dropped after loading, so nothing later
    (conversion, chat) takes the ZeRO-3 path by accident."""
    _deepspeed()
    from transformers.integrations import HfDeepSpeedConfig

    marker = HfDeepSpeedConfig(config)
    try:
        yield
    finally:
        del marker


def initialize(raw_model, optimizer, config: dict):
    deepspeed = _deepspeed()
    engine, _, _, _ = deepspeed.initialize(model=raw_model, optimizer=optimizer, config=config,
                                           model_parameters=[p for p in raw_model.parameters() if p.requires_grad])
    return engine


# What DeepSpeed's own checkpoints hold besides tensors, numbers and containers (ZeRO 1-3, offload).
SAVED_CLASSES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                 "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address")


def load_weights_only(engine) -> None:
    """Make the engine read its checkpoint files with `weights_only=True`, allowing only the few classes
    DeepSpeed saves (SAVED_CLASSES): a crafted file in iter_N_deepspeed/ is refused, never run (DeepSpeed's
    own loader unpickles anything)."""
    import importlib
    import pickle

    allowed = []
    for name in SAVED_CLASSES:
        module, _, attr = name.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass  # (another DeepSpeed version: it does not save that class)

    def load(path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).split("\n")[0]
            raise TunerError(f"{path} holds Python objects beyond DeepSpeed's own state, which tuner does not "
                             f"unpickle (loading it could run code): {first}",
                             hint="resume only from a DeepSpeed checkpoint written by tuner train") from None

    engine.checkpoint_engine.load = load


def full_parameters(raw_model, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Full tensors on CPU, gathered from their ZeRO-3 partitions (a no-op for stages 1 and 2).
    Collective: every process calls it."""
    import deepspeed

    params = [(n, p) for n, p in raw_model.named_parameters() if p.requires_grad or not trainable_only]
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        return {n: p.detach().to("cpu", copy=True) for n, p in params}


def is_stage3(engine) -> bool:
    return engine.zero_optimization_stage() == 3

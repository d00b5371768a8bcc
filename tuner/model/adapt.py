"""Decide what trains: LoRA adapters (peft) on a frozen base, or every weight (full)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tuner.config import LoraConfig
from tuner.errors import TunerError


def apply_lora(model, cfg: LoraConfig, quantized: bool = False, task: str = "CAUSAL_LM"):
    """Wrap `model` in a peft LoRA model; adapters are float32 whatever the base dtype. `task` SEQ_CLS
    (a reward model): peft also trains and saves the new score head whole."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    try:
        model = get_peft_model(model, peft_lora_config(cfg, task))
    except ValueError as e:
        if "lora_dropout" in str(e):  # a mixture of experts' fused expert weights (transformers 5): peft's
            # ParamWrapper adapts a parameter, not a layer's input, so it cannot drop out the input
            raise TunerError(f"LoRA on this model's expert weights needs lora dropout 0 (LoraConfig.dropout is "
                             f"{cfg.dropout}): {e}", hint="set lora.dropout=0.0 (--cfg-options lora.dropout=0)") from None
        raise
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def peft_lora_config(cfg: LoraConfig, task: str = "CAUSAL_LM", base: str | None = None):
    """peft's LoraConfig for tuner's (training and pth_to_hf make the same one)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,  # 'all-linear' excludes the output head in peft
        use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
        modules_to_save=cfg.modules_to_save, task_type=task, base_model_name_or_path=base)


def prepare_full(model, freeze: list[str] | None = None):
    """Full fine-tuning keeps float32 master weights: pure bf16 barely learns at small lr.
    Parameters whose names match a `freeze` pattern (a regular expression) stay frozen."""
    if any(p.dtype != torch.float32 for p in model.parameters()):  # (ZeRO-3 loads float32: its partitions stay)
        model.float()
    patterns = [re.compile(p) for p in freeze or []]
    for name, param in model.named_parameters():
        param.requires_grad_(not any(p.search(name) for p in patterns))
    if patterns and not any(p.requires_grad for p in model.parameters()):
        raise TunerError(f"model.freeze={freeze} freezes every parameter: nothing would train")
    return model


def numel(param) -> int:
    """Elements of a parameter, also when ZeRO-3 holds only this process's partition of it."""
    return getattr(param, "ds_numel", None) or param.numel()


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return trainable, total


def load_adapter(model, adapter: str | Path, base_folder: str | Path | None = None):
    """A saved PEFT adapter on `model` (a PeftModel). An adapter trained on InternLM2 (target modules
    wqkv, wo, w1, w2, w3, as XTuner trains them) is converted to the Llama names of the converted
    base first (the wqkv LoRA split into q/k/v)."""
    import tempfile

    from peft import PeftModel

    from tuner.model import internlm2

    adapter = Path(adapter)
    adapter_config = read_adapter_config(adapter)
    source = internlm2.converted_from(base_folder) if base_folder else None
    if source and internlm2.is_internlm2_adapter(adapter_config):
        with tempfile.TemporaryDirectory(prefix="tuner-adapter-") as tmp:
            converted = internlm2.convert_adapter(adapter, internlm2.read_config(Path(source)), Path(tmp))
            return PeftModel.from_pretrained(model, str(converted))
    return PeftModel.from_pretrained(model, str(adapter))


def read_adapter_config(adapter: Path) -> dict:
    """The adapter_config.json of a PEFT adapter folder, or a clear error for any other folder."""
    import json

    file = Path(adapter) / "adapter_config.json"
    if not file.is_file():
        raise TunerError(f"{adapter} is not an adapter folder (no adapter_config.json)",
                         hint="make one from a training checkpoint: tuner convert pth_to_hf CONFIG iter_N.pth DIR")
    return json.loads(file.read_text())

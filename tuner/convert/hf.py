"""`tuner convert pth_to_hf` and `tuner convert merge`.

pth_to_hf writes what training produced in the formats everyone else reads: a PEFT
adapter folder for LoRA/QLoRA (no base model is loaded for that), or a full HF model
folder with its tokenizer for full fine-tuning. merge folds an adapter into its base.
Outputs are written to a temporary folder and renamed, and an existing folder is never
overwritten.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from tuner.config import Config
from tuner.engine.checkpoint import load_checkpoint
from tuner.errors import TunerError
from tuner.model.adapt import load_adapter, read_adapter_config
from tuner.model.load import DTYPES, load_causal_lm, load_tokenizer, resolve_model_path


@contextmanager
def fresh_output_dir(save_dir: str | Path):
    """Yield a temporary folder that becomes `save_dir` only when everything was written."""
    save_dir = Path(save_dir)
    if save_dir.exists() and any(save_dir.iterdir()):
        raise TunerError(f"{save_dir} already exists and is not empty; not overwriting it")
    tmp = save_dir.with_name(save_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if save_dir.exists():
            save_dir.rmdir()
        os.replace(tmp, save_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_dtype(cfg: Config, fp32: bool) -> torch.dtype | None:
    """The dtype the base weights had in training (None = keep each tensor's own)."""
    if fp32:
        return torch.float32
    dtype = DTYPES[cfg.model.dtype]
    return None if dtype == "auto" else dtype


def pth_to_hf(cfg: Config, pth: str | Path, save_dir: str | Path, fp32: bool = False,
              max_shard_size: str = "2GB", save_format: str = "tuner") -> Path:
    state = load_checkpoint(Path(pth))
    if state.get("method") != cfg.method:
        raise TunerError(f"{pth} holds a {state.get('method')} checkpoint but the config trains {cfg.method}")
    dtype = _save_dtype(cfg, fp32)
    weights = {k: (v.to(dtype) if dtype and v.is_floating_point() else v) for k, v in state["model"].items()}
    with fresh_output_dir(save_dir) as out:
        if cfg.llava is not None:
            from tuner.convert import llava as llava_convert
            if save_format == "hf":
                llava_convert.write_llava_hf(cfg, weights, out, max_shard_size)
            else:
                llava_convert.write_llava_parts(cfg, weights, out)
        elif cfg.lora is not None:
            _write_adapter(cfg, weights, out)
        else:
            _write_full_model(cfg, weights, out, max_shard_size)
    return Path(save_dir)


def _write_adapter(cfg: Config, weights: dict, out: Path) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from safetensors.torch import save_file

    lora = cfg.lora
    peft_config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=lora.target_modules, use_rslora=lora.use_rslora,
                                 use_dora=lora.use_dora, modules_to_save=lora.modules_to_save,
                                 task_type="CAUSAL_LM", base_model_name_or_path=cfg.model.path)
    peft_config.save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    save_trained_tokenizer(cfg, out)  # chat and merge take the tokenizer, and the template trained with, from here


def save_trained_tokenizer(cfg: Config, out: Path) -> None:
    """The base's tokenizer, whose chat template is the one the model was trained with (a named
    template written as Jinja), so what was trained is what is served."""
    from tuner.data.template_jinja import trained_chat_template

    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    tokenizer.chat_template = trained_chat_template(cfg.data.template, tokenizer)
    tokenizer.save_pretrained(out)


def _write_full_model(cfg: Config, weights: dict, out: Path, max_shard_size: str) -> None:
    # meta: no second copy of the weights; the checkpoint's tensors are used as they are
    model = load_causal_lm(cfg.model.path, cfg.model.trust_remote_code, meta=True)
    model.load_state_dict(weights, assign=True, strict=False)
    model.tie_weights()  # a tied output head is saved once, under the embedding's name
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise TunerError(f"the checkpoint lacks weights of the model: {missing[:3]}")
    model.save_pretrained(out, max_shard_size=max_shard_size)
    save_trained_tokenizer(cfg, out)


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TunerError("--device cuda but no CUDA device is available; use --device cpu")
    return name


def merge(base: str, adapter: str | Path, save_dir: str | Path, max_shard_size: str = "2GB",
          device: str = "auto", trust_remote_code: bool = False) -> Path:
    """Base + adapter -> one model folder, in the base's own dtype, with the tokenizer and the chat
    template trained with."""
    adapter = Path(adapter)
    read_adapter_config(adapter)  # before any output folder is made or the base is loaded
    with fresh_output_dir(save_dir) as out:
        folder = resolve_model_path(base)
        model = load_causal_lm(folder, trust_remote_code, dtype="auto", device_map=pick_device(device))
        model = load_adapter(model, adapter, folder).merge_and_unload()
        model.save_pretrained(out, max_shard_size=max_shard_size)
        # the adapter's tokenizer carries the chat template trained with (pth_to_hf writes it); else the base's
        has_tokenizer = (adapter / "tokenizer_config.json").exists()
        load_tokenizer(str(adapter) if has_tokenizer else base, trust_remote_code).save_pretrained(out)
    return Path(save_dir)

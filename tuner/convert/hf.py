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
from tuner.model.adapt import load_adapter, peft_lora_config, read_adapter_config
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
        elif cfg.head == "reward":
            _write_reward_model(cfg, weights, out, max_shard_size)
        elif cfg.lora is not None:
            _write_adapter(cfg, weights, out)
        else:
            _write_full_model(cfg, weights, out, max_shard_size)
    return Path(save_dir)


def _write_adapter(cfg: Config, weights: dict, out: Path) -> None:
    from safetensors.torch import save_file

    peft_lora_config(cfg.lora, base=cfg.model.path).save_pretrained(str(out))
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


def _write_reward_model(cfg: Config, weights: dict, out: Path, max_shard_size: str) -> None:
    """A reward model as one folder that AutoModelForSequenceClassification loads as it is: LoRA's
    adapters merged into the base (a reward model is scored, not adapted further), the head included."""
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    if cfg.lora is None:
        model = load_causal_lm(cfg.model.path, cfg.model.trust_remote_code, meta=True, head="reward")
        model.load_state_dict(weights, assign=True, strict=False)
    else:
        from peft import get_peft_model, set_peft_model_state_dict

        model = load_causal_lm(cfg.model.path, cfg.model.trust_remote_code, head="reward",
                               dtype=DTYPES[cfg.model.dtype])
        model = get_peft_model(model, peft_lora_config(cfg.lora, "SEQ_CLS"))
        result = set_peft_model_state_dict(model, weights)
        if result.unexpected_keys:
            raise TunerError(f"the checkpoint holds weights this model lacks: {result.unexpected_keys[:3]}")
        model = model.merge_and_unload()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise TunerError(f"the checkpoint lacks weights of the model: {missing[:3]}")
    model.config.pad_token_id = tokenizer.pad_token_id  # batches of several rows need it
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

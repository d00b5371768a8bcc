"""Load a model for generation: dtype, optional 4/8-bit quantization, adapter, offloading."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from tuner.errors import TunerError
from tuner.model.adapt import load_adapter
from tuner.model.device import default_device, resolve_compute_dtype
from tuner.model.load import (
    DTYPES,
    bnb_config,
    load_causal_lm,
    load_config,
    load_tokenizer,
    resolve_model_path,
)
from tuner.model.rewards import is_reward_model


def load_chat_model(model_path: str, adapter: str | None = None, torch_dtype: str = "auto",
                    bits: int | None = None, offload_folder: str | None = None, max_memory: dict | None = None,
                    warn=print, trust_remote_code: bool = False):
    """(model, tokenizer, compute dtype) ready for `Generator`; warns when weights live off the device."""
    device = default_device()
    path = resolve_model_path(model_path)
    if is_reward_model(load_config(path, trust_remote_code)):
        raise TunerError(f"{model_path} is a reward model (a score head, no text head): it scores answers and "
                         "does not write them", hint=f"tuner score {model_path} --data FILE")
    kwargs: dict = {"dtype": DTYPES[torch_dtype]}
    if bits:
        kwargs["quantization_config"] = bnb_config(f"{bits}bit", torch_dtype)
    if offload_folder or max_memory:
        kwargs.update(device_map="auto", offload_folder=offload_folder, max_memory=max_memory)
    model = load_causal_lm(path, trust_remote_code, **kwargs)
    if not bits and "device_map" not in kwargs:
        model.to(device)
    if adapter:
        model = load_adapter(model, adapter, path)
    model.eval()
    for line in offload_warnings(getattr(model, "hf_device_map", None) or {}, device):
        warn(f"Warning: {line}")
    tokenizer_source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").exists() else model_path
    tokenizer = load_tokenizer(tokenizer_source, trust_remote_code)
    return model, tokenizer, resolve_compute_dtype(torch_dtype, device)


def load_reward_model(model_path: str, torch_dtype: str = "auto", trust_remote_code: bool = False):
    """(model, tokenizer, compute dtype) when the folder is a reward model, else None."""
    path = resolve_model_path(model_path)
    if not is_reward_model(load_config(path, trust_remote_code)):
        return None
    device = default_device()
    model = load_causal_lm(path, trust_remote_code, head="reward", dtype=DTYPES[torch_dtype]).to(device).eval()
    return model, load_tokenizer(path, trust_remote_code), resolve_compute_dtype(torch_dtype, device)


def offload_warnings(device_map: dict, device: torch.device) -> list[str]:
    """{'model.layers.0': 0, 'model.layers.9': 'cpu', 'lm_head': 'disk'} -> what runs slowly, and why."""
    where = Counter(str(v) for v in device_map.values())
    lines = []
    if where.get("disk"):
        lines.append(f"{where['disk']} of {len(device_map)} modules are offloaded to disk: every token reads "
                     "them back, so generation is much slower")
    if device.type != "cpu" and where.get("cpu"):
        lines.append(f"{where['cpu']} of {len(device_map)} modules are offloaded to the CPU (not enough GPU "
                     "memory): generation is slower")
    return lines


@dataclass
class ModelOptions:
    """What chat, serve, web and mmbench load and how: their shared flags, typed."""
    model: str
    adapter: str | None = None
    torch_dtype: str = "auto"
    bits: int | None = None
    offload_folder: str | None = None
    llava: str | None = None
    visual_encoder: str | None = None
    prompt_template: str | None = None
    stop_words: list[str] | None = None
    context_length: int | None = None
    trust_remote_code: bool = False

    @classmethod
    def from_args(cls, args) -> ModelOptions:
        """From an argparse namespace (a command has the flags it has; the others keep their defaults)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def generator_for(options: ModelOptions, with_images: bool = False):
    """The Generator that chat, serve, web and mmbench talk to: a LLaVA model (--llava, a Llava folder,
    or images to look at) or a text model."""
    import sys

    from tuner.generation.generate import Generator
    from tuner.model.llava import is_llava_folder

    o = options
    if o.llava or with_images or is_llava_folder(o.model):
        from tuner.model.llava import load_llava_for_chat

        dtype = DTYPES[o.torch_dtype] if o.torch_dtype != "auto" else torch.float32
        model, tokenizer, vision, template = load_llava_for_chat(o.model, o.llava, o.visual_encoder, dtype,
                                                                 o.trust_remote_code)
        device = default_device()
        generator = Generator(model.to(device), tokenizer, o.prompt_template or template, o.stop_words,
                              compute_dtype=resolve_compute_dtype(o.torch_dtype, device),
                              context_length=o.context_length)
        generator.vision = vision
        return generator
    model, tokenizer, compute = load_chat_model(o.model, o.adapter, o.torch_dtype, o.bits, o.offload_folder,
                                                warn=lambda line: print(line, file=sys.stderr),
                                                trust_remote_code=o.trust_remote_code)
    return Generator(model, tokenizer, o.prompt_template, o.stop_words, compute_dtype=compute,
                     context_length=o.context_length)

"""Load a model and tokenizer from a local folder, the hub, or the embedded model."""

from __future__ import annotations

from pathlib import Path

import torch

from tuner.config import EMBEDDED_MODEL, ModelConfig
from tuner.errors import TunerError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_model_path(path: str) -> str:
    """'smollm2-135m-instruct' -> its cached folder; a local folder -> itself; else a hub id."""
    if path == EMBEDDED_MODEL:
        from tuner.model.embedded import embedded_model_dir
        return str(embedded_model_dir())
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").exists() and not (local / "adapter_config.json").exists():
            raise TunerError(f"{path} is a folder but holds no config.json: not an HF model folder")
        return str(local)
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise TunerError(f"model folder not found: {path}")
    return path  # a hub id such as internlm/internlm2-chat-1_8b


def _from_pretrained(loader, path: str, **kwargs):
    """Call a transformers loader; turn 'offline' and 'not found' into one clear message."""
    try:
        return loader(path, **kwargs)
    except OSError as e:
        if Path(path).exists():
            raise TunerError(f"could not load {path}: {e}") from None
        raise TunerError(
            f"could not load {path!r} from the Hugging Face hub (offline, or no such model): {str(e).splitlines()[0]}",
            hint="download it on a machine with network access and pass the local folder, "
                 f"or use the embedded model '{EMBEDDED_MODEL}'") from None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, resolve_model_path(path),
                                 trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, device: str | torch.device = "cpu", for_training: bool = True):
    """The base model in `cfg.dtype`, quantized with bitsandbytes when `cfg.quantization` is set."""
    from transformers import AutoModelForCausalLM

    attention = cfg.attn_implementation if cfg.attn_implementation not in ("auto", "tuner_packed") else "sdpa"
    kwargs = dict(dtype=DTYPES[cfg.dtype], attn_implementation=attention,
                  trust_remote_code=cfg.trust_remote_code)
    if cfg.quantization:
        kwargs["quantization_config"] = _bnb_config(cfg)
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, resolve_model_path(cfg.path), **kwargs)
    if cfg.quantization:
        _guard_cpu_4bit(model)
    elif str(device) != "cpu":
        model.to(device)
    if for_training:
        model.config.use_cache = False  # packed sequences are isolated only without the KV cache
    return model


def _bnb_config(cfg: ModelConfig):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TunerError("quantization needs bitsandbytes", hint="pip install 'tuner[qlora]'") from None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if cfg.dtype in ("auto", "bfloat16") else DTYPES[cfg.dtype]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def _guard_cpu_4bit(model) -> None:
    # On CPU, bitsandbytes repacks 4-bit weights for a fast inference kernel after any no-grad
    # forward; gradients through the repacked weights are silently wrong. Keep the plain path.
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False

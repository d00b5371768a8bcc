"""A tokenizer as llama.cpp reads it from a GGUF file: every token in id order with its type, the rules to
split text, the special ids and the chat template.

Two kinds of tokenizer, told apart by the folder's files:

- byte-level BPE (tokenizer.json with a ByteLevel pre-tokenizer: Llama 3, Qwen, SmolLM): llama.cpp's "gpt2"
  model with the merges and `tokenizer.ggml.pre`, the name of the split rules llama.cpp applies before
  merging, which it cannot infer: tuner knows it for the SmolLM2, Llama 3 and Qwen2/3 tokenizers.
- SentencePiece (Llama 2, Mistral v0.1-v0.3, InternLM2, Gemma, Phi-3): llama.cpp's "llama" model, which
  merges the adjacent pair whose merged piece has the highest score. From tokenizer.model the pieces, scores
  and types are SentencePiece's own (what llama.cpp's converter writes); from a tokenizer.json alone (a
  SentencePiece model converted by transformers: BPE with byte fallback) a normal piece's score is minus
  its id, which orders merges as SentencePiece's scores do (a BPE model's pieces are in score order; checked
  against Google's own Gemma 3 GGUF in tests/test_gguf.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from tuner.errors import TunerError

CONTROL_SCORE = -1000.0  # (llama.cpp's converter's score for added and control tokens)


def write_vocabulary(writer, folder: Path, tokenizer, vocab_size: int) -> None:
    import gguf

    state = _tokenizer_json(folder)
    if _is_sentencepiece(folder, state):
        proto = None  # (tokenizer.model, parsed once: its pieces and its space-prefix setting)
        if (folder / "tokenizer.model").exists():
            from tuner.model.sentencepiece import read_model
            proto = read_model(folder / "tokenizer.model")
        tokens, scores, types = _sentencepiece(proto, state, tokenizer, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(_adds_space_prefix(proto, state))
        special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=len(tokens))
    else:
        tokens, types = _byte_level(tokenizer, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    # whether the tokenizer starts a text with BOS, as it does (tokenizer_config.json may not say)
    probe = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]
    special.add_to_gguf(writer)


def _tokenizer_json(folder: Path) -> dict | None:
    file = folder / "tokenizer.json"
    return json.loads(file.read_text(encoding="utf-8")) if file.exists() else None


def _is_sentencepiece(folder: Path, state: dict | None) -> bool:
    if state is None:
        if (folder / "tokenizer.model").exists():
            return True
        raise TunerError(f"{folder}: no tokenizer.json or tokenizer.model to write into the GGUF file")
    model = state.get("model", {})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


# ------------------------------------------------------------------ byte-level BPE
def pre_tokenizer(tokenizer) -> str:
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
                     hint="it knows SmolLM2, Llama 3 and Qwen2/Qwen3 tokenizers and SentencePiece ones; use "
                          "llama.cpp's convert_hf_to_gguf.py for this one")


def _byte_level(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
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


# ------------------------------------------------------------------ SentencePiece
def _sentencepiece(proto, state: dict | None, tokenizer,
                   vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, types) in id order, `vocab_size` long (the model's rows; ids no token has are
    unused padding pieces). Added tokens (chat markers) are control tokens when special, otherwise
    user-defined, matched in raw text: their '▁' written as the space it stands for."""
    from gguf import TokenType

    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [CONTROL_SCORE] * vocab_size
    types = [TokenType.UNUSED] * vocab_size
    if proto is not None:  # tokenizer.model: SentencePiece's own pieces, scores and types
        for i, piece in enumerate(proto.pieces):
            if i < vocab_size:  # (SentencePiece's types are numbered as GGUF's: normal 1 ... byte 6)
                tokens[i], scores[i], types[i] = piece.piece, piece.score, TokenType(piece.type)
    else:
        model = state["model"]
        for piece, i in model["vocab"].items():
            if i >= vocab_size:
                continue
            tokens[i] = piece
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                scores[i], types[i] = 0.0, TokenType.BYTE
            elif piece == model.get("unk_token"):
                scores[i], types[i] = 0.0, TokenType.UNKNOWN
            else:
                scores[i], types[i] = -float(i), TokenType.NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        if i >= vocab_size:  # (Gemma 3's image token, one past the text model's rows: no text gives it)
            continue
        scores[i] = CONTROL_SCORE
        if added.special:
            tokens[i], types[i] = added.content, TokenType.CONTROL
        else:
            tokens[i], types[i] = added.content.replace("▁", " "), TokenType.USER_DEFINED
    return tokens, scores, types


def _adds_space_prefix(proto, state: dict | None) -> bool:
    """Whether the tokenizer puts '▁' before a text (SentencePiece's add_dummy_prefix): Llama 2 and Mistral
    do, Gemma and InternLM2 do not."""
    if proto is not None:
        return bool(proto.normalizer_spec.add_dummy_prefix)

    def parts(node):
        if not node:
            return []
        return [p for child in node.get("normalizers", node.get("pretokenizers", [])) for p in parts(child)] or [node]

    for part in parts(state.get("normalizer")):
        if part.get("type") == "Prepend" and part.get("prepend") == "▁":
            return True
    for part in parts(state.get("pre_tokenizer")):
        if part.get("type") == "Metaspace":
            return part.get("prepend_scheme", "always" if part.get("add_prefix_space", True) else "never") != "never"
    return False

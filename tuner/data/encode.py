"""Mapped rows -> token ids and which of them are trained.

    conversation  [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    ids           <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nYo<|im_end|>\\n   (as ids)
    trained       False ...                                             True True True True
    text          {"text": "Paris is in France."} -> its ids + EOS, all trained

Rows are rendered one by one and tokenized in batches (one call into the Rust tokenizer
per batch); the trained flags come from the character spans the template marked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tuner.data.formats import RowError, check_messages
from tuner.data.templates import Rendered

IGNORE = -100


@dataclass
class Encoded:
    ids: np.ndarray  # int32
    trained: np.ndarray  # bool
    truncated: bool = False
    stages: dict = field(default_factory=dict)
    """Intermediate forms (messages, rendered text), kept only when asked for inspection"""
    images: list[str] | None = None
    """LLaVA: the sample's image files, in the order of their '<image>' tokens"""


@dataclass
class Prepared:
    """A row rendered to text, before tokenizing. `spans` None means every token is trained (pretraining)."""
    text: str
    spans: list[tuple[int, int]] | None
    messages: list[dict] | None = None
    images: list[str] | None = None


def prepare(mapped: dict, template, system: str | None) -> Prepared:
    """A mapped row ({"messages": ...} or {"text": ...}) rendered to text; bad content raises RowError."""
    if not isinstance(mapped, dict) or ("messages" not in mapped and "text" not in mapped):
        raise RowError("(map_fn)", "the map function must return {'messages': [...]} or {'text': '...'}")
    if "text" in mapped and "messages" not in mapped:
        if not isinstance(mapped["text"], str) or not mapped["text"].strip():
            raise RowError("text", "must be a non-empty string")
        return Prepared(mapped["text"], None)
    messages = check_messages(mapped["messages"])
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system, "loss": False})
    rendered: Rendered = template.render(messages, tools=mapped.get("tools"))
    return Prepared(rendered.text, rendered.spans, messages, mapped.get("images"))


def longest_token(tokenizer) -> int:
    """Characters in the tokenizer's longest token (at least 1), worked out once per tokenizer: no
    token covers more text than this, so a text of n * longest_token characters has at least n tokens."""
    return _worked_out_once(tokenizer, "longest_token",
                            lambda: max((len(t) for t in tokenizer.get_vocab()), default=1) or 1)


def _worked_out_once(tokenizer, name: str, compute):
    """`compute()`, kept on the tokenizer until its vocabulary changes (a copy given more tokens
    works it out again)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    key = (id(backend), backend.get_vocab_size(with_added_tokens=True)) if backend is not None else None
    cache = tokenizer.__dict__.setdefault("_tuner_once", {})
    if name not in cache or cache[name][0] != key:
        cache[name] = (key, compute())
    return cache[name][1]


def tokenize(batch: list[Prepared], tokenizer, max_length: int | None, keep_stages: bool = False) -> list[Encoded]:
    """Tokenize rendered rows in one call; a token is trained when it starts inside a span. A text longer
    than `max_length` tokens could possibly be is cut first (a 50 MB row took 91 s and 12 GB to tokenize
    whole, to keep its first 2,048 tokens): the kept tokens lie far before the cut, so they are the same."""
    if not batch:
        return []
    limit = max_length * longest_token(tokenizer) + 1 if max_length else None
    texts = [p.text if limit is None or len(p.text) <= limit else p.text[:limit] for p in batch]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # straight to the Rust tokenizer: the Python wrapping costs as much as tokenizing
        # A call like tokenizer(texts, padding=True) leaves padding (and truncation) set on the Rust tokenizer,
        # and encode_batch would pad every row of the batch with pad tokens; transformers sets both anew
        # on each call, so clearing them here is what its next call would do.
        if backend.padding is not None:
            backend.no_padding()
        if backend.truncation is not None:
            backend.no_truncation()
        located = token_bytes(tokenizer)
        if located is not None or all(p.spans is None for p in batch):  # the ids alone say where tokens start
            all_ids = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
            encodings = None
        else:
            encodings = backend.encode_batch(texts, add_special_tokens=False)
            all_ids = [e.ids for e in encodings]
        all_offsets = None
    else:
        located = encodings = None
        done = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        all_ids, all_offsets = done["input_ids"], done["offset_mapping"]
    out = []
    for k, prepared in enumerate(batch):
        ids = all_ids[k]
        if prepared.spans is None:  # pretraining: all of it, and an EOS to close the document
            if tokenizer.eos_token_id is not None:
                ids = ids + [tokenizer.eos_token_id]
            trained = np.ones(len(ids), dtype=bool)
        elif all_offsets is not None:
            starts = np.fromiter((a for a, _ in all_offsets[k]), dtype=np.int64, count=len(ids))
            trained = _trained_by_starts(starts, prepared.spans)
        elif encodings is not None:
            trained = _trained_by_span_edges(encodings[k], len(ids), prepared.spans, len(texts[k]))
        else:
            trained = _trained_by_bytes(np.asarray(ids, dtype=np.int64), *located, prepared.spans, texts[k])
            if trained is None:  # the ids do not add up to the text (a rare normalization): read the offsets
                encoding = backend.encode(texts[k], add_special_tokens=False)
                ids, trained = encoding.ids, _trained_by_span_edges(encoding, len(encoding.ids), prepared.spans,
                                                                    len(texts[k]))
        truncated = max_length is not None and len(ids) > max_length
        if truncated:
            ids, trained = ids[:max_length], trained[:max_length]
        encoded = Encoded(np.asarray(ids, dtype=np.int32), trained, truncated, images=prepared.images)
        if keep_stages:
            encoded.stages = {"messages": prepared.messages, "text": prepared.text}
        out.append(encoded)
    return out


def token_bytes(tokenizer) -> tuple[np.ndarray, bool] | None:
    """How many bytes of text each token id stands for, when the ids alone locate every token in the text:
    a byte-level BPE (GPT-2, SmolLM2, Qwen2.5/3, Llama 3, DeepSeek) whose normalizer changes nothing but
    NFC, whose added tokens take no spaces beside them, and whose offsets are not trimmed; None otherwise.
    The Rust tokenizer then skips computing offsets (a fifth of its time) and the trained flags come from
    the running sum of these lengths. With it: whether the normalizer is NFC (a text NFC would change
    takes the offsets path). Worked out once per tokenizer."""
    return _worked_out_once(tokenizer, "token_bytes", lambda: _token_bytes(tokenizer))


def _token_bytes(tokenizer) -> tuple[np.ndarray, bool] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    import json

    from tokenizers.pre_tokenizers import ByteLevel

    spec = json.loads(backend.to_str())
    added = spec.get("added_tokens") or []
    if (spec["model"].get("type") != "BPE" or "ByteLevel" not in _kinds(spec.get("pre_tokenizer"), "pretokenizers")
            or set(_kinds(spec.get("normalizer"), "normalizers")) - {"NFC"} or _trims(spec.get("post_processor"))
            or any(t.get("lstrip") or t.get("rstrip") for t in added)):
        return None
    alphabet = set(ByteLevel.alphabet())
    vocab = spec["model"]["vocab"]
    lengths = np.zeros(max([*vocab.values(), *(t["id"] for t in added)]) + 1, dtype=np.int64)
    added_text = {t["content"] for t in added}
    for token, i in vocab.items():
        if token in added_text:  # (DeepSeek's special tokens are in both: the added token's text counts)
            continue
        if not alphabet.issuperset(token):
            return None
        lengths[i] = len(token)  # one byte per character of the byte-level alphabet
    for t in added:
        lengths[t["id"]] = len(t["content"].encode("utf-8"))
    return lengths, "NFC" in _kinds(spec.get("normalizer"), "normalizers")


def _kinds(part: dict | None, key: str) -> list[str]:
    """The types in a tokenizer.json component, or in a Sequence of them (under `key`)."""
    if part is None:
        return []
    return [k for p in part[key] for k in _kinds(p, key)] if part.get("type") == "Sequence" else [part.get("type")]


def _trims(post_processor: dict | None) -> bool:
    """Whether a post-processor moves offsets off the spaces at a token's edges (GPT-2's ByteLevel)."""
    if post_processor is None:
        return False
    return (any(_trims(p) for p in post_processor.get("processors", []))
            or (post_processor.get("type") == "ByteLevel" and post_processor.get("trim_offsets", False)))


def _trained_by_bytes(ids: np.ndarray, lengths: np.ndarray, nfc: bool, spans, text: str) -> np.ndarray | None:
    """Tokens that start inside a span, located by the bytes each id stands for; None when the ids do not
    spell out the text byte for byte (an NFC normalizer changed it), so the caller reads the offsets."""
    import unicodedata

    ascii_text = text.isascii()
    if not ascii_text and nfc and not unicodedata.is_normalized("NFC", text):
        return None
    sizes = lengths[ids] if len(ids) else np.zeros(0, np.int64)
    ends = np.cumsum(sizes)
    total = len(text) if ascii_text else len(text.encode("utf-8"))
    if (ends[-1] if len(ends) else 0) != total:
        return None
    starts = ends - sizes
    trained = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        if not ascii_text:  # characters -> bytes
            a, b = len(text[:a].encode("utf-8")), len(text[:b].encode("utf-8"))
        trained[np.searchsorted(starts, a):np.searchsorted(starts, b)] = True
    return trained


def _trained_by_starts(starts: np.ndarray, spans) -> np.ndarray:
    trained = np.zeros(len(starts), dtype=bool)
    for a, b in spans:
        trained |= (starts >= a) & (starts < b)
    return trained


def _first_token_from(encoding, char: int, n_tokens: int, n_chars: int) -> int | None:
    """The index of the first token that starts at or after `char` (n_tokens past the end); None when
    the character maps to no token (a normalizer dropped it): the caller then reads every offset."""
    if char >= n_chars:
        return n_tokens
    token = encoding.char_to_token(char)
    if token is None:
        return None
    return token if encoding.token_to_chars(token)[0] >= char else token + 1


def _trained_by_span_edges(encoding, n_tokens: int, spans, n_chars: int) -> np.ndarray:
    """Tokens that start inside a span, found from the spans' edges (a few lookups per reply), not by
    reading every token's offsets: the same flags, a third of tokenizing's Python time saved."""
    trained = np.zeros(n_tokens, dtype=bool)
    for a, b in spans:
        first, end = _first_token_from(encoding, a, n_tokens, n_chars), _first_token_from(encoding, b, n_tokens, n_chars)
        if first is None or end is None:
            return _trained_by_starts(np.asarray([o[0] for o in encoding.offsets], dtype=np.int64), spans)
        trained[first:end] = True
    return trained


def encode_row(mapped: dict, tokenizer, template, system: str | None, max_length: int | None,
               keep_stages: bool = False) -> Encoded:
    return tokenize([prepare(mapped, template, system)], tokenizer, max_length, keep_stages)[0]


def encode_conversation(messages: list[dict], tokenizer, template, max_length: int | None,
                        tools: list | None = None) -> Encoded:
    rendered = template.render(messages, tools=tools)
    return tokenize([Prepared(rendered.text, rendered.spans, messages)], tokenizer, max_length)[0]

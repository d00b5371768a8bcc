"""One mapped row -> token ids and which of them are trained.

    conversation  [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    ids           <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nYo<|im_end|>\\n   (as ids)
    trained       False ...                                             True True True True
    text          {"text": "Paris is in France."} -> its ids + EOS, all trained
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuner.data.formats import RowError, check_messages

IGNORE = -100


@dataclass
class Encoded:
    ids: list[int]
    trained: list[bool]
    truncated: bool = False
    stages: dict = field(default_factory=dict)
    """Intermediate forms (messages, rendered text), kept only when asked for inspection"""


def encode_conversation(messages: list[dict], tokenizer, template, max_length: int | None,
                        tools: list | None = None, keep_stages: bool = False) -> Encoded:
    """Render with the template and tokenize; only the template's trainable spans are trained."""
    rendered = template.render(messages, tools=tools)
    encoding = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    trained = [False] * len(ids)
    span = 0
    for i, (start, _end) in enumerate(offsets):
        while span < len(rendered.spans) and start >= rendered.spans[span][1]:
            span += 1
        if span < len(rendered.spans) and rendered.spans[span][0] <= start:
            trained[i] = True
    out = _truncate(ids, trained, max_length)
    if keep_stages:
        out.stages = {"messages": messages, "text": rendered.text}
    return out


def encode_text(text: str, tokenizer, max_length: int | None, keep_stages: bool = False) -> Encoded:
    """Pretraining: every token of the document and a closing EOS are trained."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    out = _truncate(ids, [True] * len(ids), max_length)
    if keep_stages:
        out.stages = {"text": text}
    return out


def _truncate(ids: list[int], trained: list[bool], max_length: int | None) -> Encoded:
    if max_length is not None and len(ids) > max_length:
        return Encoded(ids[:max_length], trained[:max_length], truncated=True)
    return Encoded(ids, trained)


def encode_row(mapped: dict, tokenizer, template, system: str | None, max_length: int | None,
               keep_stages: bool = False) -> Encoded:
    """A mapped row ({"messages": ...} or {"text": ...}) -> Encoded; bad content raises RowError."""
    if not isinstance(mapped, dict) or ("messages" not in mapped and "text" not in mapped):
        raise RowError("(map_fn)", "the map function must return {'messages': [...]} or {'text': '...'}")
    if "text" in mapped and "messages" not in mapped:
        if not isinstance(mapped["text"], str) or not mapped["text"].strip():
            raise RowError("text", "must be a non-empty string")
        return encode_text(mapped["text"], tokenizer, max_length, keep_stages)
    messages = check_messages(mapped["messages"])
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system, "loss": False})
    return encode_conversation(messages, tokenizer, template, max_length, mapped.get("tools"), keep_stages)

"""Preference rows: a prompt and two answers, the chosen one better than the rejected one.

Their map function (`preference_map_fn`, in formats.py with the others) takes every form below to
one shape, {"messages": the prompt conversation, "chosen": [assistant
messages], "rejected": [assistant messages]}:

    {"prompt": "2+2?", "chosen": "4.", "rejected": "5."}                  TRL's standard form [, "system"]
    {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4."}],
     "rejected": [{"role": "assistant", "content": "5."}]}                TRL's conversational form, XTuner's DPO data
    {"chosen": [user, assistant], "rejected": [user, other assistant]}   whole conversations (UltraFeedback):
                                                                          the shared history is the prompt
    {"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello", "rejected": "...Assistant: Go away"}   Anthropic HH-RLHF

Each pair is rendered twice with the data's template, prompt + chosen and prompt + rejected, and
only the answer's tokens are trained.
"""

from __future__ import annotations

import numpy as np

from tuner.data.encode import Encoded, Prepared, longest_token, tokenize
from tuner.data.formats import RowError, check_messages


def prepare_pair(mapped: dict, template, system: str | None,
                 names: tuple[str, ...] = ("chosen", "rejected")) -> tuple[Prepared, Prepared | None]:
    """prompt + chosen and prompt + rejected rendered to text, the answers alone trained (`names`
    ('completion',): one answer, KTO's)."""
    prompt = [m for m in mapped.get("messages") or []]
    if not any(isinstance(m, dict) and m.get("role") == "user" for m in prompt):
        raise RowError("prompt", "is empty: a preference example needs a user message to answer")
    answers = {}
    for name in names:
        messages = mapped.get(name)
        if not isinstance(messages, list) or not messages:
            raise RowError(name, "missing or empty")
        bad = next((m for m in messages if not isinstance(m, dict) or m.get("role") != "assistant"), None)
        if bad is not None:
            raise RowError(name, f"must hold the assistant's answer, got {bad.get('role') if isinstance(bad, dict) else bad!r}")
        answers[name] = messages
    if len(names) == 2 and [m.get("content") for m in answers["chosen"]] == [m.get("content") for m in
                                                                           answers["rejected"]]:
        raise RowError("rejected", "is the same as chosen: the pair says nothing")
    prompt = [{**m, "loss": False} for m in prompt]  # history is context, never trained
    if system is not None and prompt[0].get("role") != "system":
        prompt.insert(0, {"role": "system", "content": system, "loss": False})
    out = []
    for name in names:
        messages = check_messages(prompt + [{**m, "loss": True} for m in answers[name]])
        rendered = template.render(messages, tools=mapped.get("tools"))
        out.append(Prepared(rendered.text, rendered.spans, messages))
    return out[0], out[1] if len(out) == 2 else None


def prepare_unpaired(mapped: dict, template, system: str | None) -> Prepared:
    """KTO: prompt + completion rendered to text, the completion alone trained."""
    return prepare_pair(mapped, template, system, names=("completion",))[0]


def _cut_text(prepared: Prepared, limit: int) -> Prepared:
    """At most `limit` characters of the prompt's end and of the answer's start: a text cannot have
    fewer tokens than characters / longest token, so no kept token changes (a 50 MB row is not
    tokenized whole)."""
    start = prepared.spans[0][0] if prepared.spans else 0
    head = max(0, start - limit)
    if head == 0 and len(prepared.text) <= start + limit:
        return prepared
    text = prepared.text[head:start + limit]
    spans = [(max(a - head, 0), min(b - head, len(text))) for a, b in prepared.spans if a - head < len(text)]
    return Prepared(text, spans, prepared.messages)


def tokenize_pairs(pairs: list[tuple[Prepared, Prepared]], tokenizer, max_length: int | None) -> list[tuple[Encoded, Encoded]]:
    """Both answers of each pair, cut to `max_length` tokens each the way a pair needs it: the
    prompt's end and the answers' start are kept (the same prompt tokens in both)."""
    if not pairs:
        return []
    flat = [p for pair in pairs for p in pair]
    if max_length:
        flat = [_cut_text(p, max_length * longest_token(tokenizer) + 1) for p in flat]
    encoded = tokenize(flat, tokenizer, None)
    return [truncate_pair(encoded[2 * k], encoded[2 * k + 1], max_length) for k in range(len(pairs))]


def tokenize_unpaired(examples: list[Prepared], tokenizer, max_length: int | None) -> list[Encoded]:
    """KTO's single answers, cut as a pair's are (the prompt's end and the answer's start kept)."""
    if not examples:
        return []
    if max_length:
        examples = [_cut_text(p, max_length * longest_token(tokenizer) + 1) for p in examples]
    return [truncate_pair(e, e, max_length)[0] for e in tokenize(examples, tokenizer, None)]


def truncate_pair(chosen: Encoded, rejected: Encoded, max_length: int | None) -> tuple[Encoded, Encoded]:
    """Each answer keeps its start, at least half of `max_length` when the prompt is long; the prompt
    keeps its end, as much as the longer answer leaves room for."""
    starts = [int(np.argmax(e.trained)) if e.trained.any() else len(e.ids) for e in (chosen, rejected)]
    if not max_length or all(len(e.ids) <= max_length for e in (chosen, rejected)):
        return chosen, rejected
    prompt = min(starts)
    answers = [min(len(e.ids) - s, max(max_length - prompt, max_length // 2)) for e, s in zip((chosen, rejected), starts)]
    kept_prompt = min(prompt, max_length - max(answers))
    out = []
    for e, s, a in zip((chosen, rejected), starts, answers):
        window = slice(s - kept_prompt, s + a)
        out.append(Encoded(e.ids[window].copy(), e.trained[window].copy(), truncated=True))
    return out[0], out[1]

"""Prompts for online RL: rows -> (the prompt as the reward functions see it, its token ids, the other columns).

A row gives its prompt as
    {"prompt": "text"} or {"prompt": [{"role": "user", "content": ...}, ...]}   (TRL's format)
    {"messages": [...]}              the conversation up to its last user turn (a final reply is dropped)
    {"question": ..., "answer": ...}  GSM8K                {"problem": ..., "solution": ...}  MATH
    {"instruction": ..., "input": ...}  Alpaca
and every other column (GSM8K's `answer`, MATH's `solution`, yours) goes to the reward functions as a
keyword list, as TRL passes them. The prompt is rendered with the chat template and its generation
prompt, like a chat turn; a prompt over `max_prompt_length` tokens loses its start (counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from tuner.data.formats import RowError
from tuner.data.sources import BAD_ROW, iter_rows
from tuner.data.templates import get_template
from tuner.errors import TunerError

PROMPT_KEYS = ("prompt", "messages", "question", "problem", "instruction")


@dataclass
class PromptSet:
    prompts: list = field(default_factory=list)
    """each row's prompt as given (a string, or messages): what reward functions receive as `prompts`"""
    ids: list[list[int]] = field(default_factory=list)
    columns: list[dict] = field(default_factory=list)
    """each row's other columns"""
    cut: int = 0
    """prompts that lost their start to max_prompt_length"""
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def num_tokens(self, i: int) -> int:
        return len(self.ids[i])

    def details(self) -> str:
        return ""  # (the data report's other lines: a prompt set has its summary only)

    def summary(self) -> str:
        lengths = sorted(len(i) for i in self.ids)
        median = lengths[len(lengths) // 2] if lengths else 0
        return (f"{len(self)} prompts, {median} tokens median, {lengths[-1] if lengths else 0} longest"
                + (f"; {self.cut} cut from the left to max_prompt_length" if self.cut else "")
                + (f"; {self.skipped} bad rows skipped" if self.skipped else ""))


def prompt_of(row: dict, map_fn: Callable | None = None) -> tuple[object, list[dict], dict]:
    """(the prompt as given, as messages, the other columns) of one row (made by `map_fn` first, if given)."""
    if map_fn is not None:
        row = map_fn(row)
    if row.get(BAD_ROW):
        raise RowError("", row[BAD_ROW])
    if "prompt" in row and row["prompt"] is not None:
        given, key = row["prompt"], "prompt"
        messages = [{"role": "user", "content": given}] if isinstance(given, str) else _messages(given, "prompt")
    elif row.get("messages") is not None:
        messages, key = _messages(row["messages"], "messages"), "messages"
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            raise RowError("messages", "no user message to answer")
        messages = messages[:last_user + 1]
        given = messages
    else:
        key = next((k for k in ("question", "problem") if isinstance(row.get(k), str)), None)
        if key is not None:
            given = row[key]
        elif isinstance(row.get("instruction"), str):
            key, given = "instruction", row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
        else:
            raise RowError("prompt", f"no prompt: expected one of {', '.join(PROMPT_KEYS)} "
                                     f"(row has: {', '.join(row) or 'nothing'})")
        if not given.strip():
            raise RowError(key, "empty")
        messages = [{"role": "user", "content": given}]
    columns = {k: v for k, v in row.items() if k != key and not (key == "instruction" and k == "input")}
    return given, messages, columns


def _messages(value, name: str) -> list[dict]:
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) and "role" in m for m in value):
        raise RowError(name, "must be a string or a list of {'role': ..., 'content': ...} messages")
    return [dict(m) for m in value]


def prompt_conversations(data, limit: int) -> list[dict]:
    """The first rows' prompts, each with a short reply after it: what checking a named template against the
    tokenizer's own renders (bad rows are left to build_prompts to report)."""
    out = []
    for source in data.source_list():
        for _, _, row in iter_rows(source.path, source.split, source.revision, source.subset):
            try:
                messages = prompt_of(row, source.map_fn)[1]
            except (RowError, KeyError, TypeError, ValueError):
                continue
            out.append({"messages": messages + [{"role": "assistant", "content": "42"}]})
            if len(out) >= limit:
                return out
    return out


def build_prompts(data, tokenizer, max_prompt_length: int, say: Callable[[str], None] = print) -> PromptSet:
    """Every row of the data's sources as a prompt (`data`: a DataConfig; map_fn, if given, makes each row)."""
    template = get_template(data.template, tokenizer)
    out = PromptSet()
    for source in data.source_list():
        for place, line, row in iter_rows(source.path, source.split, source.revision, source.subset):
            try:
                given, messages, columns = prompt_of(row, source.map_fn)
                if data.system and messages[0]["role"] != "system":
                    messages = [{"role": "system", "content": data.system}] + messages
                text = template.render(messages, add_generation_prompt=True).text
            except (RowError, TunerError, KeyError, TypeError, ValueError) as e:
                if data.skip_bad_rows:
                    out.skipped += 1
                    continue
                raise TunerError(f"{place}:{line}: {e}", hint="fix the row, or set data.skip_bad_rows=True") from None
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > max_prompt_length:
                ids, out.cut = ids[-max_prompt_length:], out.cut + 1
            out.prompts.append(given)
            out.ids.append(ids)
            out.columns.append(columns)
    if not out.ids:
        raise TunerError(f"no prompts in {data.path or [s.path for s in data.sources]}")
    return out

"""Does a named template render like the tokenizer's own chat template? Compared by token ids.

    >>> report = compare_templates(get_template("qwen2_5_chat", tok), tok, conversations)
    >>> report.summary()
    '12 of 12 rows identical in token ids'

Used by `tuner check-template`, by `tuner train` on its first rows, and by the tests against
the real tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuner.errors import TunerError


@dataclass
class Difference:
    row: int  # 0-based index of the conversation
    where: str  # 'the whole conversation' or 'the generation prompt'
    ours: str
    official: str
    token: int  # index of the first differing token

    def describe(self, context: int = 40) -> str:
        at = first_difference(self.ours, self.official)
        show = lambda text: repr(text[max(0, at - context):at + context])  # noqa: E731
        return (f"row {self.row + 1}, {self.where}: first difference at token {self.token} (character {at})\n"
                f"  named template: {show(self.ours)}\n  tokenizer's:    {show(self.official)}")


@dataclass
class TemplateReport:
    rows: int = 0
    identical: int = 0
    skipped: int = 0  # rows the tokenizer's own template cannot render: roles it refuses, tool calls it drops
    differences: list[Difference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.identical == self.rows - self.skipped

    def summary(self) -> str:
        text = f"{self.identical} of {self.rows - self.skipped} rows identical in token ids"
        return text + (f" ({self.skipped} rows the tokenizer's own template cannot render)" if self.skipped else "")


def official_render(tokenizer, messages: list[dict], add_generation_prompt: bool, tools=None, **kwargs) -> str:
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **extra, **kwargs)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def compare_templates(template, tokenizer, conversations: list[dict]) -> TemplateReport:
    """Each conversation ({'messages': [...], 'tools': [...]}) rendered whole and as a prompt for its
    last assistant reply, by `template` and by the tokenizer's own, compared as token ids."""
    if not getattr(tokenizer, "chat_template", None):
        raise TunerError("the tokenizer has no chat template of its own to compare with")
    report = TemplateReport()
    for row, conversation in enumerate(conversations):
        messages, tools = conversation["messages"], conversation.get("tools")
        clean = [{k: v for k, v in m.items() if k != "loss"} for m in messages]
        report.rows += 1
        cases = [("the whole conversation", clean, False)]
        last_reply = max((i for i, m in enumerate(clean) if m["role"] == "assistant"), default=None)
        if last_reply:
            cases.append(("the generation prompt", clean[:last_reply], True))
        uses_tools = any(m.get("tool_calls") or m["role"] == "tool" for m in clean)
        if uses_tools and "tool_calls" not in tokenizer.chat_template:
            report.skipped += 1  # the official template drops tool calls: nothing to compare with
            continue
        try:
            official = [official_render(tokenizer, m, prompt, tools) for _, m, prompt in cases]
        except Exception:  # jinja2's TemplateError, raise_exception(): the official template refuses the row
            report.skipped += 1
            continue
        for (where, part, prompt), theirs in zip(cases, official):
            ours = template.render(part, add_generation_prompt=prompt, tools=tools).text
            a, b = _ids(tokenizer, ours), _ids(tokenizer, theirs)
            if a != b:
                report.differences.append(Difference(row, where, ours, theirs, first_difference(a, b)))
                break
        else:
            report.identical += 1
    return report


def first_difference(a, b) -> int:
    """Where two sequences (texts, token ids) first differ: the shorter one's length if one starts the other."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

"""A tokenizer's chat template rendered once per conversation shape instead of twice per row.

Finding the trained spans of a row takes two renders of the tokenizer's Jinja template (the whole
conversation and the prefix before each reply): at a million alpaca rows, as much time as the
tokenizer itself. Most templates write each message's content as it is, and what else they write
depends only on the roles. For those, the conversation is rendered once per shape (the roles, the
loss flags, the generation prompt) with a placeholder as every content; a row is then the shape's
text with its contents put in, and its spans shift by the contents' lengths.

Whether a template writes contents as they are is watched while the shape renders: each placeholder
is a `_Watched` string, and any use of it other than being written out or appended to (a test of it,
a comparison, its length, a method such as strip or split, a slice, a hash) marks the shape as
depending on the content, and its rows are rendered one by one as before. A filter that escapes (tojson,
escape) changes the placeholder, whose control characters and <&> every escaping rewrites, so it is
not found as it is: the same fallback. Tested equal to rendering row by row on every real tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

SAFE = {"__str__", "__add__", "__new__", "__init__", "__class__", "__getattribute__", "__init_subclass__",
        "__subclasshook__", "__doc__", "__setattr__", "__delattr__"}
"""What a template may do with a content without depending on it: write it out, append to it"""


class _Watched(str):
    uses: list  # what was done with the placeholders of one shape (one list per shape: threads may build at once)


def _watching(name):
    method = getattr(str, name)

    def watched(self, *args, **kwargs):
        self.uses.append(name)
        return method(self, *args, **kwargs)
    return watched


for _name in dir(str):
    if _name not in SAFE and callable(getattr(str, _name)):
        setattr(_Watched, _name, _watching(_name))


def placeholder(i: int) -> str:
    return f"\x01<tuner&{i}>\x02"


@dataclass
class Shape:
    """A conversation shape's text, cut where each message's content goes."""
    pieces: list  # literal text and message indices, in order
    order: list[tuple[int, int]]  # (message, its placeholder's length) for each content, in the text's order
    spans: list[tuple[tuple[int, int], tuple[int, int]]]
    """each span's start and end: (offset in the placeholder text, how many contents lie before it)"""

    def fill(self, contents: list[str]) -> tuple[str, list[tuple[int, int]]]:
        text = "".join(contents[p] if isinstance(p, int) else p for p in self.pieces)
        shift = [0]
        for i, width in self.order:
            shift.append(shift[-1] + len(contents[i]) - width)
        return text, [(a + shift[k], b + shift[m]) for (a, k), (b, m) in self.spans]


def key(messages: list[dict], add_generation_prompt: bool, tools) -> tuple | None:
    """The shape of a conversation, or None when it has more than roles and contents (tools, tool calls,
    names): those render row by row."""
    if tools or any(set(m) - {"role", "content", "loss"} or not isinstance(m.get("content"), str) for m in messages):
        return None
    return tuple((m["role"], bool(m.get("loss", True))) for m in messages), add_generation_prompt


def build(render, messages: list[dict], add_generation_prompt: bool) -> Shape | None:
    """Render the shape of `messages` with `render(messages, add_generation_prompt)` -> (Rendered, exact)
    (exact: no span end was moved to a token boundary), or None when the template depends on the contents."""
    uses = []
    marked = []
    for i, m in enumerate(messages):
        content = _Watched(placeholder(i))
        content.uses = uses
        marked.append({**m, "content": content})
    rendered, exact = render(marked, add_generation_prompt)
    text, spans = rendered.text, rendered.spans
    if uses or not exact:
        return None
    places = []
    for i in range(len(messages)):
        mark = placeholder(i)
        if text.count(mark) != 1:
            return None
        start = text.index(mark)
        places.append((start, start + len(mark), i))
    places.sort()
    pieces, position = [], 0
    for start, end, i in places:
        pieces += [text[position:start], i]
        position = end
    pieces.append(text[position:])

    def boundary(offset):
        if any(start < offset < end for start, end, _ in places):
            return None
        return offset, sum(end <= offset for _, end, _ in places)
    cut = [(boundary(a), boundary(b)) for a, b in spans]
    if any(a is None or b is None for a, b in cut):
        return None
    return Shape([p for p in pieces if p != ""], [(i, end - start) for start, end, i in places], cut)

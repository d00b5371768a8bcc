"""Prompt templates: named ones (XTuner's names) and the tokenizer's own Jinja template.

Both kinds render a conversation into text plus the character spans the model is
trained on (assistant replies and their end marker). Training, chat and the
evaluate-chat hook all render through `render`, so what is trained is what is served.

    >>> t = get_template("chatml")
    >>> r = t.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    >>> r.text
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n'
    >>> [r.text[a:b] for a, b in r.spans]
    ['Hello!<|im_end|>']
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuner.errors import TunerError


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)
    """[start, end) character ranges of `text` that carry loss"""


@dataclass(frozen=True)
class PromptTemplate:
    """A template is data: how each role is written, and the words that end a reply."""
    name: str
    system: str  # contains {system}
    user: str  # contains {input}; ends with the assistant's header
    suffix: str  # written (and trained) after each assistant reply
    sep: str = ""  # written (not trained) after the suffix, before the next turn
    prefix: str = ""  # written once at the start (a BOS token, say)
    default_system: str | None = None
    stop_words: tuple[str, ...] = ()

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> Rendered:
        out = Rendered(self.prefix)
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            out.text += self.system.format(system=self.default_system)
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "system":
                out.text += self.system.format(system=content)
            elif role == "user":
                out.text += self.user.format(input=content)
            elif role == "assistant":
                start = len(out.text)
                out.text += content + self.suffix
                if message.get("loss", True):
                    out.spans.append((start, len(out.text)))
                out.text += self.sep
            else:
                raise TunerError(f"template {self.name!r} cannot render role {role!r}")
        if add_generation_prompt and messages and messages[-1]["role"] == "assistant":
            raise TunerError("add_generation_prompt after an assistant message")
        # The assistant header is part of `user`, so a prompt ending in a user turn is ready.
        return out


class ChatTemplate:
    """The tokenizer's own Jinja `chat_template`, with trainable spans found by prefix rendering.

    For each assistant turn i, rendering messages[:i] with the generation prompt gives a
    prefix P and rendering messages[:i+1] gives Q; the reply is Q[len(P):]. This works for
    any template, with or without `{% generation %}` markers, as long as rendering is
    prefix-stable (earlier turns do not change when later ones are added).
    """
    name = "tokenizer"

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise TunerError("this tokenizer has no chat_template",
                             hint="set prompt_template to a named template, e.g. 'chatml' or 'default'")
        self.tokenizer = tokenizer
        self.stop_words = tuple(w for w in (tokenizer.eos_token,) if w)

    def _apply(self, messages, add_generation_prompt):
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        return self.tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=add_generation_prompt)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> Rendered:
        text = self._apply(messages, add_generation_prompt)
        out = Rendered(text)
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or not message.get("loss", True):
                continue
            before = self._apply(messages[:i], add_generation_prompt=True)
            through = self._apply(messages[: i + 1], add_generation_prompt=False)
            if not (through.startswith(before) and text.startswith(through)):
                raise TunerError("the tokenizer's chat template is not prefix-stable (it rewrites earlier turns), "
                                 "so assistant tokens cannot be located",
                                 hint="set prompt_template to a named template")
            out.spans.append((len(before), len(through)))
        return out


TEMPLATES: dict[str, PromptTemplate] = {}


def register_template(template: PromptTemplate) -> None:
    if template.name in TEMPLATES:
        raise ValueError(f"template {template.name!r} is already registered")
    TEMPLATES[template.name] = template


register_template(PromptTemplate(
    name="default", system="<|System|>:{system}\n", user="<|User|>:{input}\n<|Bot|>:",
    suffix="<|endoftext|>", sep="\n", stop_words=("<|endoftext|>",)))
register_template(PromptTemplate(
    name="chatml", system="<|im_start|>system\n{system}<|im_end|>\n",
    user="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
    suffix="<|im_end|>", sep="\n", stop_words=("<|im_end|>",)))
register_template(PromptTemplate(
    name="qwen_chat", system="<|im_start|>system\n{system}<|im_end|>\n",
    user="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
    suffix="<|im_end|>", sep="\n", stop_words=("<|im_end|>", "<|endoftext|>")))
register_template(PromptTemplate(
    name="internlm2_chat", prefix="<s>", system="<|im_start|>system\n{system}<|im_end|>\n",
    user="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
    suffix="<|im_end|>", sep="\n", stop_words=("<|im_end|>",)))
register_template(PromptTemplate(
    name="llama3_chat", prefix="<|begin_of_text|>",
    system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n",
    suffix="<|eot_id|>", stop_words=("<|eot_id|>",)))
register_template(PromptTemplate(
    name="phi3_chat", system="<|system|>\n{system}<|end|>\n", user="<|user|>\n{input}<|end|>\n<|assistant|>\n",
    suffix="<|end|>", sep="\n", stop_words=("<|end|>",)))


def get_template(name: str | None, tokenizer=None) -> PromptTemplate | ChatTemplate:
    """A named template, or the tokenizer's own when `name` is None."""
    if name is None:
        if tokenizer is None:
            raise TunerError("the tokenizer's chat template needs a tokenizer")
        return ChatTemplate(tokenizer)
    if name not in TEMPLATES:
        raise TunerError(f"unknown prompt template {name!r}; known templates: {', '.join(TEMPLATES)} "
                         "(or None for the tokenizer's own)")
    return TEMPLATES[name]

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

import json
import os
from dataclasses import dataclass, field, replace

from tuner.data import template_shapes
from tuner.data.template_data import TEMPLATE_DATA
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
    user: str  # contains {input} (and maybe {round}); ends with the assistant's header
    suffix: str  # written (and trained) after each assistant reply
    sep: str = ""  # written (not trained) after the suffix
    prefix: str = ""  # written once at the start (a BOS token, say)
    end: str = ""  # written once after a conversation that ends with a reply (not in prompts)
    default_system: str | None = None
    stop_words: tuple[str, ...] = ()
    reply_prefix: str = ""  # written (and trained) before each reply, after the generation prompt
    trim: bool = False  # strip spaces and newlines around every message's content (Llama 3, Gemma 3)
    system_in: str = "turn"  # where a system prompt goes: a turn of its own ('turn'), or before the content of
    # the first user turn ('first_user', Gemma 3) or of the last one ('last_user', Mistral v3), then a blank line
    think: bool = False  # Qwen3: replies after the last user turn carry a <think> block, empty if none was given
    special_tokens: tuple[str, ...] = ()  # tokens the tokenizer must have as single tokens
    tool_style: str = "hermes"  # 'hermes': tools in the system prompt, <tool_call> blocks, <tool_response> results;
    # 'llama3_1': tools in the first user turn, a call as {"name", "parameters"}, results in `tool` turns;
    # 'mistral': [AVAILABLE_TOOLS] before the last user turn, [TOOL_CALLS] with ids, results with their call ids;
    # 'deepseek': tools in the system prompt (DeepSeek V3's template writes none), DeepSeek's own call and output tokens
    tool: str | None = None  # how a tool result turn is written ({input}; Mistral v7 also {call_id}: then the
    # content is written as it is, else Mistral's results are JSON with their call ids); None: as a user turn
    tools_list: str = "[AVAILABLE_TOOLS]{tools}[/AVAILABLE_TOOLS]"  # 'mistral': how the tool list is written
    tool_calls_start: str = "[TOOL_CALLS]"  # 'mistral': what starts a reply that calls tools (no reply_prefix)
    tool_arguments: str = "object"  # how string `arguments` of a tool call are written: 'object' (parsed),
    # 'verbatim' (the string as it is, Qwen3), 'json' (JSON-encoded again, as Qwen2.5's tojson does)

    def bind(self, tokenizer) -> "PromptTemplate":
        """Fill {bos}, {eos} with the tokenizer's tokens and {date} with today's ('01 Dec 2026', as
        the official Llama 3.1 template does); stop words gain the EOS token."""
        import time

        bos = (getattr(tokenizer, "bos_token", None) or "") if tokenizer is not None else ""
        eos = (getattr(tokenizer, "eos_token", None) or "") if tokenizer is not None else ""
        today = time.strftime("%d %b %Y")
        fill = lambda text: text.replace("{bos}", bos).replace("{eos}", eos).replace("{date}", today)  # noqa: E731
        stop = tuple(dict.fromkeys(w for w in (*self.stop_words, eos) if w))
        return replace(self, system=fill(self.system), user=fill(self.user), suffix=fill(self.suffix),
                       sep=fill(self.sep), prefix=fill(self.prefix), end=fill(self.end), stop_words=stop)

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None) -> Rendered:
        out = Rendered(self.prefix)
        llama_tools, mistral_tools = self.tool_style == "llama3_1", self.tool_style == "mistral"
        deepseek_tools = self.tool_style == "deepseek"
        messages = messages if llama_tools or mistral_tools else _group_tool_results(
            messages, deepseek_output_text if deepseek_tools else tool_response_text)
        system_tools = None if llama_tools or mistral_tools else tools  # where the tool list goes
        clean = (lambda text: text.strip()) if self.trim else (lambda text: text)  # noqa: E731
        has_system = bool(messages) and messages[0]["role"] == "system"
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), -1)
        user_prefix, prefixed = "", -1  # the system prompt written before one user turn's content
        if self.system_in != "turn" and has_system:
            user_prefix = with_tools(messages[0].get("content") or "", system_tools) + "\n\n"
            messages = messages[1:]
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            prefixed = (users[0] if self.system_in == "first_user" else users[-1]) if users else -1
            first_user -= 1
        elif not has_system and (self.default_system is not None or system_tools):
            out.text += self._system(with_tools(self.default_system or "", system_tools), tools)
        last_query = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        round_number = 0
        mistral_tools = mistral_tools and bool(tools)
        for i, message in enumerate(messages):
            role, content = message["role"], message.get("content") or ""
            if role == "system":
                out.text += self._system(with_tools(clean(content), system_tools), tools)
            elif role == "user":
                round_number += 1
                text = (user_prefix if i == prefixed else "") + clean(content)
                if llama_tools and tools and i == first_user:
                    text = llama3_1_tools_text(tools) + text
                if mistral_tools and i == last_query:
                    out.text += self.tools_list.replace("{tools}", json.dumps(tools, ensure_ascii=False))
                out.text += self.user.format(input=text, round=round_number)
            elif role == "tool":  # a tool's results go back to the model (as a user turn unless `tool` says)
                if llama_tools:  # the official template JSON-encodes the content, even a string
                    content = json.dumps(content, ensure_ascii=False)
                elif self.tool_style == "mistral" and "{call_id}" not in (self.tool or ""):
                    content = json.dumps({"content": content, "call_id": message.get("tool_call_id")},
                                         ensure_ascii=False)
                out.text += (self.tool or self.user).format(input=content, round=round_number,
                                                            call_id=message.get("tool_call_id") or "")
            elif role == "assistant":
                start = len(out.text)
                body = clean(content)
                if self.think and i > last_query:
                    body = _think_block(message, body, last=i == len(messages) - 1)
                if llama_tools and message.get("tool_calls"):  # the call is the whole reply
                    body = "\n".join(llama3_1_call_text(c) for c in message["tool_calls"])
                elif self.tool_style == "mistral" and message.get("tool_calls"):
                    body = self.tool_calls_start + mistral_calls_text(message["tool_calls"])
                elif deepseek_tools:
                    body += deepseek_calls_text(message.get("tool_calls"), self.tool_arguments)
                else:
                    body += tool_calls_text(message.get("tool_calls"), bool(body), self.tool_arguments)
                mistral_call = self.tool_style == "mistral" and message.get("tool_calls")
                out.text += ("" if mistral_call else self.reply_prefix) + body + self.suffix
                if message.get("loss", True):
                    out.spans.append((start, len(out.text)))
                out.text += self.sep
            else:
                raise TunerError(f"template {self.name!r} cannot render role {role!r}")
        if add_generation_prompt and messages and messages[-1]["role"] == "assistant":
            raise TunerError("add_generation_prompt after an assistant message")
        if not add_generation_prompt and messages and messages[-1]["role"] == "assistant" and self.end:
            out.text += self.end
            if messages[-1].get("loss", True):  # the closing token is learned, as with the official template
                out.spans[-1] = (out.spans[-1][0], len(out.text))
        # The assistant header is part of `user`, so a prompt ending in a user turn is ready.
        return out

    def check_tokens(self, tokenizer) -> None:
        """Refuse a tokenizer that lacks the template's special tokens (llama3_chat on a Qwen tokenizer):
        the markers would be split into ordinary text pieces and the model never learns its format."""
        vocab = tokenizer.get_vocab()
        missing = [t for t in self.special_tokens if t not in vocab]
        if missing:
            raise TunerError(f"the prompt template {self.name!r} needs the special tokens {', '.join(missing)}, which "
                             f"this tokenizer does not have", hint="use the template of the model's family, or "
                             "prompt_template=None for the tokenizer's own")

    def _system(self, text: str, tools: list | None = None) -> str:
        return (self.system.replace("{environment}", "Environment: ipython\n" if tools else "")
                .replace("{system}", text))


def _group_tool_results(messages: list[dict], wrap=None) -> list[dict]:
    """Consecutive tool results -> one 'tool' turn holding each in <tool_response> tags (or what `wrap`
    writes), as the Qwen, Hermes and DeepSeek templates write them (one turn, not one per result)."""
    grouped: list[dict] = []
    for message in messages:
        if message["role"] != "tool":
            grouped.append(message)
            continue
        text = (wrap or tool_response_text)(message.get("content") or "")
        if grouped and grouped[-1]["role"] == "tool":
            grouped[-1] = {**grouped[-1], "content": grouped[-1]["content"] + "\n" + text}
        else:
            grouped.append({**message, "content": text})
    return grouped


def _think_block(message: dict, content: str, last: bool) -> str:
    """Qwen3: '<think>\n{reasoning}\n</think>\n\n{answer}' for the last reply, or one that has
    reasoning; reasoning comes from `reasoning_content` or a <think> block inside the content."""
    reasoning = message.get("reasoning_content")
    if reasoning is None and "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        content = content.split("</think>")[-1].lstrip("\n")
    reasoning = reasoning or ""
    if last or reasoning:
        return "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
    return content


class ChatTemplate:
    """The tokenizer's own Jinja `chat_template`, with trainable spans found by prefix rendering.

    For each assistant turn i, rendering messages[:i] with the generation prompt gives a
    prefix P and rendering messages[:i+1] gives Q; the reply is what Q adds to P, as far
    as Q agrees with the whole conversation's text (a template may close a conversation
    with an EOS that the next turn replaces). This works for any template, with or
    without `{% generation %}` markers, as long as earlier turns render the same when
    later ones are added.
    """
    name = "tokenizer"

    def __init__(self, tokenizer):
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            raise TunerError("this tokenizer has no chat_template",
                             hint="set prompt_template to a named template, e.g. 'chatml' or 'default'")
        self.tokenizer = tokenizer
        self.knows_tools = "tool_calls" in source
        self.stop_words = tuple(w for w in (tokenizer.eos_token,) if w)

    def _apply(self, messages, add_generation_prompt, tools=None):
        clean = []
        for m in messages:
            content = m.get("content")  # (not `or ""`: a shape's placeholder must not be tested, see template_shapes)
            message = {"role": m["role"], "content": "" if content is None else content}
            if m.get("tool_calls"):
                if self.knows_tools:
                    message["tool_calls"] = m["tool_calls"]
                else:  # a template without tool support would drop the calls: keep them as text
                    message["content"] += tool_calls_text(m["tool_calls"])
            for key in ("name", "tool_call_id"):
                if key in m:
                    message[key] = m[key]
            clean.append(message)
        kwargs = {"tools": tools} if tools else {}
        if tools and not self.knows_tools:  # the template would drop them: list them in the system prompt
            kwargs = {}
            if clean and clean[0]["role"] == "system":
                clean[0] = {**clean[0], "content": with_tools(clean[0]["content"], tools)}
            else:
                clean.insert(0, {"role": "system", "content": with_tools("", tools)})
        return self._render_jinja(clean, add_generation_prompt, kwargs.get("tools"))

    def _render_jinja(self, messages: list[dict], add_generation_prompt: bool, tools) -> str:
        """What `apply_chat_template(tokenize=False)` renders, from transformers' compiled template with the
        same variables, without its per-call conversion of every message (a third of preparing a row's time;
        tests check the two agree on every real tokenizer). Falls back to apply_chat_template."""
        if not hasattr(self, "_compiled"):
            try:
                from transformers.utils.chat_template_utils import _compile_jinja_template
                self._compiled = _compile_jinja_template(self.tokenizer.chat_template)
                self._variables = dict(self.tokenizer.special_tokens_map)
            except (ImportError, AttributeError, TypeError):
                self._compiled = None
        if self._compiled is None:
            kwargs = {"tools": tools} if tools else {}
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **kwargs)
        return self._compiled.render(messages=messages, tools=tools or None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self._variables)

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None) -> Rendered:
        """The conversation's text and trained spans: from its shape's text where the template writes contents
        as they are (tuner/data/template_shapes.py), else rendered (twice per reply)."""
        shape_key = template_shapes.key(messages, add_generation_prompt, tools)
        if shape_key is not None:
            shapes = self.__dict__.setdefault("_shapes", {})
            if shape_key not in shapes:
                shapes[shape_key] = template_shapes.build(self._render_each, messages, add_generation_prompt)
            if shapes[shape_key] is not None:
                return Rendered(*shapes[shape_key].fill([m["content"] for m in messages]))
        return self._render_each(messages, add_generation_prompt, tools)[0]

    def _render_each(self, messages: list[dict], add_generation_prompt: bool, tools=None) -> tuple[Rendered, bool]:
        """(rendered, whether every span ends where a turn's text ends: none moved to a token boundary)"""
        text = self._apply(messages, add_generation_prompt, tools)
        out, exact = Rendered(text), True
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or not message.get("loss", True):
                continue
            before = self._apply(messages[:i], add_generation_prompt=True, tools=tools)
            last = i == len(messages) - 1  # then rendering through this turn is the whole text
            through = text if last else self._apply(messages[: i + 1], add_generation_prompt=False, tools=tools)
            if not (text.startswith(before) and through.startswith(before)):
                raise TunerError("the tokenizer's chat template is not prefix-stable (it rewrites earlier turns), "
                                 "so assistant tokens cannot be located",
                                 hint="set prompt_template to a named template")
            if text.startswith(through):
                end = len(through)
            else:  # the template closes a conversation differently from how the next turn opens
                end = self._token_boundary(text, len(os.path.commonprefix([through, text])))
                exact = False
            out.spans.append((len(before), end))
        return out, exact

    def _token_boundary(self, text: str, end: int) -> int:
        """Move `end` back to the start of a special token it would cut in two
        ('<|end|>\\n<|endoftext|>' and '<|end|>\\n<|user|>' agree up to '<|')."""
        if not hasattr(self, "_special"):
            self._special = [t for t in self.tokenizer.get_added_vocab() if len(t) > 1]
        for token in self._special:
            for start in range(max(0, end - len(token) + 1), end):
                if text.startswith(token, start):
                    return start
        return end


HERMES_TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                      "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
HERMES_TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                      "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                      "\"arguments\": <args-json-object>}\n</tool_call>")


def with_tools(system: str, tools: list | None) -> str:
    """A system prompt that lists the tools, in the Hermes / Qwen format."""
    if not tools:
        return system
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (system + "\n\n" if system else "") + HERMES_TOOLS_INTRO + listed + HERMES_TOOLS_OUTRO


def tool_calls_text(calls: list | None, after_content: bool = True, string_arguments: str = "object") -> str:
    """[{"function": {"name": "f", "arguments": {...}}}] -> '\n<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>'
    (calls are separated by a newline, and the first from the reply's text when there is some)."""
    pieces = []
    for call in calls or []:
        function = call.get("function", call)
        arguments = function.get("arguments", {})
        name = json.dumps(function["name"], ensure_ascii=False)
        if isinstance(arguments, str) and string_arguments == "verbatim":
            written = arguments
        else:
            if isinstance(arguments, str) and string_arguments == "object":
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    pass  # not JSON: kept as a string
            written = json.dumps(arguments, ensure_ascii=False)
        pieces.append('<tool_call>\n{"name": ' + name + ', "arguments": ' + written + '}\n</tool_call>')
    if not pieces:
        return ""
    return ("\n" if after_content else "") + "\n".join(pieces)


LLAMA3_1_TOOLS = ("Given the following functions, please respond with a JSON for a function call with its proper "
                  "arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
                  "\"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n")


def llama3_1_tools_text(tools: list) -> str:
    """What Llama 3.1 writes before the first user message when tools are given (each tool as JSON,
    indented by 4, then a blank line)."""
    return LLAMA3_1_TOOLS + "".join(json.dumps(t, ensure_ascii=False, indent=4) + "\n\n" for t in tools)


def llama3_1_call_text(call: dict) -> str:
    """{"function": {"name": "f", "arguments": {...}}} -> '{"name": "f", "parameters": {...}}'
    (string arguments are JSON-encoded again, as the official template's tojson does)."""
    function = call.get("function", call)
    return ('{"name": "' + function["name"] + '", "parameters": ' +
            json.dumps(function.get("arguments", {}), ensure_ascii=False) + "}")


def mistral_calls_text(calls: list) -> str:
    """[{"id": "abc123def", "function": {"name": "f", "arguments": '{"x": 1}'}}] ->
    '[{"name": "f", "arguments": {"x": 1}, "id": "abc123def"}]' (Mistral's own encoder parses string arguments)."""
    written = []
    for call in calls:
        function = call.get("function", call)
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        written.append({"name": function["name"], "arguments": arguments, **({"id": call["id"]} if "id" in call else {})})
    return json.dumps(written, ensure_ascii=False)


def tool_response_text(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


DEEPSEEK_CALLS = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>")
DEEPSEEK_CALL = ("<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>")
DEEPSEEK_OUTPUT = ("<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>")


def deepseek_calls_text(calls: list | None, string_arguments: str = "verbatim") -> str:
    """DeepSeek V3 / R1's call block: <｜tool▁calls▁begin｜>, then per call (joined by a newline)
    <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME, a newline, the arguments in a ```json fence and
    <｜tool▁call▁end｜>; then <｜tool▁calls▁end｜> (which DeepSeek V3's published template forgets
    after a single call)."""
    if not calls:
        return ""
    pieces = []
    for call in calls:
        function = call.get("function", call)
        arguments = function.get("arguments", {})
        written = arguments if isinstance(arguments, str) and string_arguments == "verbatim" else json.dumps(
            arguments, ensure_ascii=False)
        pieces.append(DEEPSEEK_CALL[0] + call.get("type", "function") + DEEPSEEK_CALL[1] + function["name"] +
                      "\n```json\n" + written + "\n```" + DEEPSEEK_CALL[2])
    return DEEPSEEK_CALLS[0] + "\n".join(pieces) + DEEPSEEK_CALLS[1]


def deepseek_output_text(content: str) -> str:
    return DEEPSEEK_OUTPUT[0] + content + DEEPSEEK_OUTPUT[1]


TEMPLATES: dict[str, PromptTemplate] = {}


def register_template(template: PromptTemplate) -> None:
    if template.name in TEMPLATES:
        raise ValueError(f"template {template.name!r} is already registered")
    TEMPLATES[template.name] = template


for _name, _fields in TEMPLATE_DATA.items():
    register_template(PromptTemplate(name=_name, **_fields))


def get_template(name: str | None, tokenizer=None) -> PromptTemplate | ChatTemplate:
    """A named template, or the tokenizer's own when `name` is None."""
    if name is None:
        if tokenizer is None:
            raise TunerError("the tokenizer's chat template needs a tokenizer")
        return ChatTemplate(tokenizer)
    if name not in TEMPLATES:
        raise TunerError(f"unknown prompt template {name!r}; known templates: {', '.join(TEMPLATES)} "
                         "(or None for the tokenizer's own)")
    template = TEMPLATES[name].bind(tokenizer)
    if tokenizer is not None:
        template.check_tokens(tokenizer)
    return template

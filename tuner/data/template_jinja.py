"""A named template written as a Jinja chat template, so the folders tuner writes carry the
template they were trained with: `tokenizer.apply_chat_template`, vLLM, llama.cpp and `tuner chat`
then render prompts exactly as training did.

    >>> print(to_jinja(get_template("chatml"))[:60])
    {%- set ns = namespace(round=0, user_prefix='', prefixed=-1, ...

The Jinja renders the same text as `PromptTemplate.render` (tests check every named template on
conversations with and without a system prompt, tools, tool results, several turns). One
approximation: a tool call whose `arguments` is a string is written as that string, where the
Python side parses and re-dumps it (the same text whenever the string is plain JSON).
"""

from __future__ import annotations

import json
import re

from tuner.data.templates import (DEEPSEEK_CALL, DEEPSEEK_CALLS, DEEPSEEK_OUTPUT, HERMES_TOOLS_INTRO,
                                  HERMES_TOOLS_OUTRO, LLAMA3_1_TOOLS, PromptTemplate)


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _expression(fmt: str, values: dict[str, str]) -> str:
    """'<|im_start|>user\\n{input}<|im_end|>' -> '"<|im_start|>user\\n" + content + "<|im_end|>"'."""
    names = {"bos": "bos_token", "eos": "eos_token", "date": 'strftime_now("%d %b %Y")', "environment": "''",
             **values}
    parts = []
    for piece in re.split(r"(\{(?:" + "|".join(names) + r")\})", fmt):
        if not piece:
            continue
        parts.append(f"({names[piece[1:-1]]})" if piece[1:-1] in names and piece.startswith("{") else _literal(piece))
    return " + ".join(parts) or '""'


def to_jinja(t: PromptTemplate) -> str:
    """The template (before `bind`: {bos}, {eos} stay the tokenizer's tokens) as Jinja."""
    llama_tools, mistral_tools = t.tool_style == "llama3_1", t.tool_style == "mistral"
    trim = "|trim" if t.trim else ""
    with_tools = "ns.sys" if llama_tools or mistral_tools else (
        "(ns.sys + ('\\n\\n' if ns.sys else '') + " + _literal(HERMES_TOOLS_INTRO) +
        " + (tools|map('tojson')|join('\\n')) + " + _literal(HERMES_TOOLS_OUTRO) + ") if tools else ns.sys")
    system = _expression(t.system, {"system": "ns.sys", "environment": "'Environment: ipython\\n' if tools else ''"})
    system = system.replace("(ns.sys)", "(" + with_tools + ")")
    user = _expression(t.user, {"input": "ns.input", "round": "ns.round|string"})
    tool_turn = _expression(t.tool or t.user, {"input": "ns.input", "round": "ns.round|string",
                                               "call_id": "m.tool_call_id or ''"})
    call_id_results = mistral_tools and "{call_id}" in (t.tool or "")  # Mistral v7: the content as it is
    call = ("'<tool_call>\\n{\"name\": ' + (f.name|tojson) + ', \"arguments\": ' + "
            + ("(f.arguments|tojson)" if t.tool_arguments == "json" else
               "(f.arguments if f.arguments is string else (f.arguments|tojson))") + " + '}\\n</tool_call>'")
    wrap = (DEEPSEEK_OUTPUT if t.tool_style == "deepseek" else ("<tool_response>\n", "\n</tool_response>"))
    grouping = [  # consecutive tool results -> one turn holding each in <tool_response> tags
        "{%- for m in messages -%}",
        "{%- if m.role == 'tool' -%}",
        "{%- set text = " + _literal(wrap[0]) + " + (m.content or '') + " + _literal(wrap[1]) + " -%}",
        "{%- if ns.items and ns.items[-1].role == 'tool' -%}",
        "{%- set ns.items = ns.items[:-1] + [{'role': 'tool', 'content': ns.items[-1].content + '\\n' + text}] -%}",
        "{%- else -%}{%- set ns.items = ns.items + [{'role': 'tool', 'content': text}] -%}{%- endif -%}",
        "{%- else -%}{%- set ns.items = ns.items + [m] -%}{%- endif -%}",
        "{%- endfor -%}",
        "{%- set items = ns.items -%}"] if not (llama_tools or mistral_tools) else ["{%- set items = messages -%}"]
    if mistral_tools:  # arguments given as a JSON string are parsed by Mistral's encoder: written as they are here
        calls = ["{%- if m.tool_calls -%}{%- set ns.body = " + _literal(t.tool_calls_start + "[") + " -%}",
                 "{%- for c in m.tool_calls -%}{%- set f = c.function if c.function is defined else c -%}",
                 "{%- set ns.body = ns.body + (', ' if not loop.first else '') + '{\"name\": ' + (f.name|tojson) + "
                 "', \"arguments\": ' + (f.arguments if f.arguments is string else (f.arguments|tojson)) + "
                 "((', \"id\": ' + (c.id|tojson)) if c.id is defined else '') + '}' -%}",
                 "{%- endfor -%}{%- set ns.body = ns.body + ']' -%}{%- endif -%}",
                 "{{- (ns.body if m.tool_calls else " + _literal(t.reply_prefix) + " + ns.body) -}}"]
    elif llama_tools:
        calls = ["{%- if m.tool_calls -%}{%- set ns.body = '' -%}",
                 "{%- for c in m.tool_calls -%}{%- set f = c.function if c.function is defined else c -%}",
                 "{%- set ns.body = ns.body + ('\\n' if not loop.first else '') + '{\"name\": \"' + f.name + "
                 "'\", \"parameters\": ' + (f.arguments|tojson) + '}' -%}",
                 "{%- endfor -%}{%- endif -%}",
                 "{{- " + _literal(t.reply_prefix) + " + ns.body -}}"]
    elif t.tool_style == "deepseek":
        verbatim = t.tool_arguments == "verbatim"
        arguments = "(f.arguments if f.arguments is string else (f.arguments|tojson))" if verbatim else (
            "(f.arguments|tojson)")
        calls = ["{{- " + _literal(t.reply_prefix) + " + ns.body -}}",
                 "{%- if m.tool_calls -%}{{- " + _literal(DEEPSEEK_CALLS[0]) + " -}}{%- endif -%}",
                 "{%- for c in m.tool_calls or [] -%}{%- set f = c.function if c.function is defined else c -%}",
                 "{{- ('\\n' if not loop.first else '') + " + _literal(DEEPSEEK_CALL[0]) +
                 " + (c.type if c.type is defined else 'function') + " + _literal(DEEPSEEK_CALL[1]) + " + f.name + "
                 "'\\n```json\\n' + " + arguments + " + '\\n```' + " + _literal(DEEPSEEK_CALL[2]) + " -}}",
                 "{%- endfor -%}",
                 "{%- if m.tool_calls -%}{{- " + _literal(DEEPSEEK_CALLS[1]) + " -}}{%- endif -%}"]
    else:
        calls = ["{{- " + _literal(t.reply_prefix) + " + ns.body -}}",
                 "{%- for c in m.tool_calls or [] -%}{%- set f = c.function if c.function is defined else c -%}",
                 "{{- ('\\n' if (ns.body or not loop.first) else '') + " + call + " -}}",
                 "{%- endfor -%}"]
    return "".join([
        "{%- set ns = namespace(round=0, user_prefix='', prefixed=-1, sys='', input='', body='', last_query=-1, "
        "first_user=-1, items=[]) -%}",
        *grouping,
        "{{- " + _expression(t.prefix, {}) + " -}}",
        "{%- set has_system = items and items[0].role == 'system' -%}",
        *(["{%- if has_system -%}{%- set ns.sys = items[0].content or '' -%}",
           "{%- set ns.user_prefix = (" + with_tools + ") + '\\n\\n' -%}{%- set items = items[1:] -%}",
           "{%- for m in items -%}{%- if m.role == 'user' and (ns.prefixed < 0 or "
           + ("false" if t.system_in == "first_user" else "true") + ") -%}{%- set ns.prefixed = loop.index0 -%}"
           "{%- endif -%}{%- endfor -%}"]
          if t.system_in != "turn" else
          ["{%- if false -%}"]),
        "{%- elif not has_system and (" + ("true" if t.default_system is not None else "false") +
        (" or tools" if not (llama_tools or mistral_tools) else "") + ") -%}",
        "{%- set ns.sys = " + _literal(t.default_system or "") + " -%}",
        "{{- " + system + " -}}",
        "{%- endif -%}",
        "{%- for m in items -%}{%- if m.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}"
        "{%- if ns.first_user < 0 -%}{%- set ns.first_user = loop.index0 -%}{%- endif -%}{%- endif -%}"
        "{%- endfor -%}",
        "{%- for m in items -%}",
        "{%- set content = m.content or '' -%}",
        "{%- if m.role == 'system' -%}",
        "{%- set ns.sys = content" + trim + " -%}",
        "{{- " + system + " -}}",
        "{%- elif m.role == 'user' -%}",
        "{%- set ns.round = ns.round + 1 -%}",
        "{%- set ns.input = (ns.user_prefix if loop.index0 == ns.prefixed else '') + (content" + trim + ") -%}",
        *(["{%- if tools and loop.index0 == ns.first_user -%}{%- set ns.input = " + _literal(LLAMA3_1_TOOLS) +
           " + (tools|map('tojson', indent=4)|join('\\n\\n')) + '\\n\\n' + ns.input -%}{%- endif -%}"]
          if llama_tools else []),
        *(["{%- if tools and loop.index0 == ns.last_query -%}{{- " +
           _expression(t.tools_list, {"tools": "tools|tojson"}) + " -}}{%- endif -%}"] if mistral_tools else []),
        "{{- " + user + " -}}",
        "{%- elif m.role == 'tool' -%}",
        "{%- set ns.input = " + ("content|tojson" if llama_tools else
                                 "({'content': content, 'call_id': m.tool_call_id if m.tool_call_id is defined else "
                                 "none}|tojson)" if mistral_tools and not call_id_results else "content")
        + " -%}{{- " + tool_turn + " -}}",
        "{%- elif m.role == 'assistant' -%}",
        "{%- set ns.body = content" + trim + " -%}",
        *(["{%- if loop.index0 > ns.last_query -%}",
           "{%- set reasoning = m.reasoning_content if m.reasoning_content is defined and m.reasoning_content is not "
           "none else none -%}",
           "{%- if reasoning is none and '</think>' in ns.body -%}",
           "{%- set reasoning = ns.body.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}",
           "{%- set ns.body = ns.body.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}",
           "{%- set reasoning = reasoning or '' -%}",
           "{%- if loop.last or reasoning -%}",
           "{%- set ns.body = '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + ns.body.lstrip('\\n') -%}",
           "{%- endif -%}{%- endif -%}"] if t.think else []),
        *calls,
        "{{- " + _expression(t.suffix, {}) + " + " + _expression(t.sep, {}) + " -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if not add_generation_prompt and items and items[-1].role == 'assistant' -%}{{- "
        + _expression(t.end, {}) + " -}}{%- endif -%}",
    ])


def trained_chat_template(template_name: str | None, tokenizer) -> str | None:
    """The chat template a model trained with `data.template = template_name` should carry: the
    named template as Jinja, or the tokenizer's own when no name is given."""
    from tuner.data.templates import TEMPLATES

    if template_name is None:
        return getattr(tokenizer, "chat_template", None)
    return to_jinja(TEMPLATES[template_name])

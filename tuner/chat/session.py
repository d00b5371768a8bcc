"""A multi-turn conversation with optional tools: what `tuner chat` keeps between messages.

The history holds messages; replies carry the token ids the model generated, so later
prompts splice those ids in (see generate.py). When the history no longer fits the
context, the oldest rounds are dropped and `on_event` is told how many.
"""

from __future__ import annotations

import json
from typing import Callable

from tuner.chat.tools import Toolbox, parse_tool_calls, react_observation, react_system
from tuner.generation.generate import GenerationSettings, Generator, PromptTooLong

MAX_TOOL_ROUNDS = 5


class ChatSession:
    def __init__(self, generator: Generator, system: str | None = None, toolbox: Toolbox | None = None,
                 tool_format: str = "json"):
        self.generator, self.toolbox, self.tool_format = generator, toolbox, tool_format
        if toolbox and tool_format == "react":
            system = react_system(system or "", toolbox.specs)
        self.system = system
        self.tools = toolbox.specs if toolbox and tool_format == "json" else None
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str, settings: GenerationSettings, on_text: Callable[[str], None] | None = None,
             on_event: Callable[[str], None] = print, images: list | None = None) -> str:
        """Answer one user message (with images for a LLaVA model), running tool calls (at most
        MAX_TOOL_ROUNDS) when plugins are on."""
        before = len(self.messages)
        message = {"role": "user", "content": text}
        if images:
            message = {"role": "user", "content": "<image>\n" * len(images) + text, "images": list(images)}
        self.messages.append(message)
        for _ in range(MAX_TOOL_ROUNDS + 1):
            try:
                kept, ids, dropped = self.generator.fit(self.messages, settings.max_new_tokens, self.tools)
            except PromptTooLong:
                del self.messages[before:]  # the history stays as it was
                raise
            if dropped:
                self.messages = kept
                before = len(kept) - 1
                on_event(f"Log: dropped the {dropped} oldest round(s) of the conversation to fit the "
                         f"{self.generator.context_length}-token context")
            reply = self.generator.generate([ids], settings, [on_text],
                                            pixel_values=self.generator.pixel_values(self.messages))[0]
            content, calls = parse_tool_calls(reply.text) if self.toolbox else (reply.text, [])
            self.messages.append({"role": "assistant", "content": content, "tool_calls": calls or None,
                                  "ids": reply.ids})
            if not calls:
                return content
            for call in calls:
                result = self.toolbox.run(call)
                on_event(f"[{call['function']['name']}] {_arguments(call)} -> {result}")
                if self.tool_format == "react":
                    self.messages.append({"role": "user", "content": react_observation(result)})
                else:
                    self.messages.append({"role": "tool", "content": result, "tool_call_id": call["id"],
                                          "name": call["function"]["name"]})
            if on_text is not None:
                on_text("\n")
        return content


def _arguments(call: dict) -> str:
    arguments = call["function"]["arguments"]
    try:
        return json.dumps(json.loads(arguments), ensure_ascii=False)
    except (TypeError, json.JSONDecodeError):
        return str(arguments)

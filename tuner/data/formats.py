"""Map functions: one dataset row -> {"messages": [...]} (a conversation) or {"text": ...}
(pretraining). Each docstring shows a row before and after.

A map function raises `RowError(field, message)` for a row it cannot use; the loader
adds the file and line.
"""

from __future__ import annotations

import json
import re
from typing import Callable

ROLES = ("system", "user", "assistant", "tool")

ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")


class RowError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"field {field!r}: {message}" if field else message)
        self.field = field


def _require(row: dict, *names: str) -> None:
    for name in names:
        if name not in row or row[name] is None:
            raise RowError(name, f"missing (row has: {', '.join(row) or 'nothing'})")


def _string(row: dict, name: str) -> str:
    value = row.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(name, f"must be a string, got {type(value).__name__}")
    return value


def openai_map_fn(row: dict) -> dict:
    """Rows already in the OpenAI format pass through, with their tools if any.

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    -> the same messages. "loss": false (or "false") on an assistant message keeps it out of
    the loss; assistant "tool_calls", "tool" messages and a "tools" list are kept for templates.
    """
    _require(row, "messages")
    out = {"messages": row["messages"]}
    if row.get("tools"):
        tools = row["tools"]
        out["tools"] = json.loads(tools) if isinstance(tools, str) else tools
    return out


def alpaca_map_fn(row: dict) -> dict:
    """{"instruction": "Add", "input": "1 and 2", "output": "3"}
    -> [{"role": "system", "content": ALPACA_SYSTEM},
        {"role": "user", "content": "Add\\n1 and 2"}, {"role": "assistant", "content": "3"}]
    """
    _require(row, "instruction", "output")
    extra = _string(row, "input")
    prompt = f"{_string(row, 'instruction')}\n{extra}" if extra else _string(row, "instruction")
    return {"messages": [{"role": "system", "content": ALPACA_SYSTEM},
                         {"role": "user", "content": prompt},
                         {"role": "assistant", "content": _string(row, "output")}]}


def alpaca_zh_map_fn(row: dict) -> dict:
    """{"instruction_zh": "加", "input_zh": "1 和 2", "output_zh": "3"}
    -> [{"role": "user", "content": "加\\n1 和 2"}, {"role": "assistant", "content": "3"}]
    """
    _require(row, "instruction_zh", "output_zh")
    extra = _string(row, "input_zh")
    prompt = f"{_string(row, 'instruction_zh')}\n{extra}" if extra else _string(row, "instruction_zh")
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": _string(row, "output_zh")}]}


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def sharegpt_map_fn(row: dict) -> dict:
    """{"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]}
    -> [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hey"}]
    """
    _require(row, "conversations")
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise RowError("conversations", f"must be a list, got {type(turns).__name__}")
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError(f"conversations[{i}]", "must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise RowError(f"conversations[{i}].from",
                           f"must be one of {', '.join(SHAREGPT_ROLES)}, got {turn['from']!r}")
        messages.append({"role": role, "content": turn["value"]})
    return {"messages": messages}


OASST1_TURN = re.compile(r"### (Human|Assistant):")


def oasst1_map_fn(row: dict) -> dict:
    """{"text": "### Human: Hi### Assistant: Hello### Human: Bye### Assistant: Bye!"}
    -> user "Hi", assistant "Hello", user "Bye", assistant "Bye!"
    """
    _require(row, "text")
    parts = OASST1_TURN.split(_string(row, "text"))
    if len(parts) < 3:
        raise RowError("text", "has no '### Human:' / '### Assistant:' turns")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return {"messages": messages}


def pretrain_map_fn(row: dict) -> dict:
    """{"text": "Paris is the capital of France."} -> the same text: every token is trained,
    and an EOS token closes each document."""
    _require(row, "text")
    text = _string(row, "text")
    if not text.strip():
        raise RowError("text", "is empty")
    return {"text": text}


MSAGENT_CALL = re.compile(r"<\|startofthink\|>\s*```JSON\s*(\{.*?\})\s*```\s*<\|endofthink\|>", re.S)


def msagent_map_fn(row: dict) -> dict:
    """MSAgent-Bench rows (ReAct-style agent data) -> OpenAI tool calls.

    {"conversations": [{"from": "system", "value": "..."}, {"from": "user", "value": "Weather in Paris?"},
      {"from": "assistant", "value": "I will check.<|startofthink|>```JSON\\n{\\"api_name\\": \\"weather\\",
        \\"parameters\\": {\\"city\\": \\"Paris\\"}}\\n```<|endofthink|>"},
      {"from": "function", "value": "18 degrees"}, {"from": "assistant", "value": "It is 18 degrees."}]}
    -> user, assistant "I will check." with tool_calls [weather(city=Paris)], tool "18 degrees", assistant.
    """
    _require(row, "conversations")
    roles = {"system": "system", "user": "user", "assistant": "assistant", "function": "tool", "observation": "tool"}
    messages = []
    for i, turn in enumerate(row["conversations"]):
        role = roles.get(turn.get("from"))
        if role is None:
            raise RowError(f"conversations[{i}].from", f"must be one of {', '.join(roles)}, got {turn.get('from')!r}")
        content = turn.get("value") or ""
        message = {"role": role, "content": content}
        if role == "assistant":
            calls = []
            for match in MSAGENT_CALL.finditer(content):
                try:
                    call = json.loads(match.group(1))
                except json.JSONDecodeError as e:
                    raise RowError(f"conversations[{i}].value", f"tool call is not valid JSON: {e.msg}") from None
                calls.append({"type": "function", "function": {"name": call.get("api_name", call.get("name")),
                                                               "arguments": call.get("parameters", {})}})
            if calls:
                message = {"role": role, "content": MSAGENT_CALL.sub("", content).strip(), "tool_calls": calls}
        messages.append(message)
    return {"messages": messages}


def xtuner_map_fn(row: dict) -> dict:
    """XTuner's own single-file format (its custom-dataset docs):
    {"conversation": [{"system": "Be brief.", "input": "Hi", "output": "Hello"}, {"input": "Bye", "output": "Bye!"}]}
    -> system "Be brief.", user "Hi", assistant "Hello", user "Bye", assistant "Bye!"
    """
    _require(row, "conversation")
    turns = row["conversation"]
    if not isinstance(turns, list) or not turns:
        raise RowError("conversation", "must be a non-empty list of {system, input, output} turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "output" not in turn:
            raise RowError(f"conversation[{i}]", "must be an object with 'input' and 'output'")
        if turn.get("system"):
            messages.append({"role": "system", "content": turn["system"]})
        messages += [{"role": "user", "content": turn.get("input") or ""},
                     {"role": "assistant", "content": turn["output"] or ""}]
    return {"messages": messages}


IMAGE_TOKEN = "<image>"


def llava_map_fn(row: dict) -> dict:
    """LLaVA's rows: ShareGPT conversations and "image" (or "images") -> messages with one '<image>' per
    image, and the image paths. A row with images but no '<image>' gets one before its first user message
    (LLaVA's convention); a row without images is text-only."""
    images = row.get("images") if row.get("images") is not None else ([row["image"]] if row.get("image") else [])
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise RowError("images", "must be a list of image paths")
    messages = sharegpt_map_fn(row)["messages"]
    placeholders = sum(str(m["content"]).count(IMAGE_TOKEN) for m in messages)
    if images and placeholders == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise RowError("conversations", "has images but no human turn to put them in")
        first_user["content"] = f"{IMAGE_TOKEN}\n{first_user['content']}"
        placeholders = 1 if len(images) == 1 else 0
    if placeholders != len(images):
        raise RowError("conversations", f"{placeholders} {IMAGE_TOKEN} placeholders for {len(images)} images")
    return {"messages": messages, "images": images}


# ---------------------------------------------------------------- preference pairs (data/preference.py)

HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _as_messages(value, name: str, role: str) -> list[dict]:
    """A string (one message of `role`), one message, or a list of messages."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError(name, "is empty")
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and value:
        return list(value)
    raise RowError(name, "missing or empty" if value in (None, [], "") else
                   f"must be a string or a list of messages, got {type(value).__name__}")


def _hh_messages(text: str, name: str) -> list[dict]:
    """'\\n\\nHuman: Hi\\n\\nAssistant: Hello' -> [user Hi, assistant Hello]."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise RowError(name, "a string without a prompt must be an HH-RLHF dialogue ('\\n\\nHuman: ... "
                             "\\n\\nAssistant: ...')")
    return [{"role": "user" if who == "Human" else "assistant", "content": said}
            for who, said in zip(parts[1::2], parts[2::2])]


def _whole_conversation(value) -> bool:
    """A message list holding more than the assistant's answer."""
    return isinstance(value, list) and any(isinstance(m, dict) and m.get("role") != "assistant" for m in value)


def preference_map_fn(row: dict) -> dict:
    """Any of the forms in this module's docstring -> {"messages", "chosen", "rejected"}."""
    for name in ("chosen", "rejected"):
        if row.get(name) in (None, "", []):
            raise RowError(name, f"missing or empty (row has: {', '.join(row) or 'nothing'})")
    if "prompt" in row and not (_whole_conversation(row["chosen"]) or _whole_conversation(row["rejected"])):
        prompt = _as_messages(row["prompt"], "prompt", "user")
        chosen = _as_messages(row["chosen"], "chosen", "assistant")
        rejected = _as_messages(row["rejected"], "rejected", "assistant")
    else:  # whole conversations: the prompt is what they share (UltraFeedback binarized also has it as 'prompt')
        chosen_all = (_hh_messages(row["chosen"], "chosen") if isinstance(row["chosen"], str)
                      else _as_messages(row["chosen"], "chosen", "assistant"))
        rejected_all = (_hh_messages(row["rejected"], "rejected") if isinstance(row["rejected"], str)
                        else _as_messages(row["rejected"], "rejected", "assistant"))
        shared = 0
        while (shared < min(len(chosen_all), len(rejected_all)) - 1
               and chosen_all[shared] == rejected_all[shared]):
            shared += 1
        prompt, chosen, rejected = chosen_all[:shared], chosen_all[shared:], rejected_all[shared:]
    system = row.get("system")
    if isinstance(system, str) and system.strip() and not (prompt and prompt[0].get("role") == "system"):
        prompt = [{"role": "system", "content": system}, *prompt]
    return {"messages": prompt, "chosen": chosen, "rejected": rejected}


def kto_map_fn(row: dict) -> dict:
    """TRL's unpaired form {"prompt", "completion", "label": true / false} -> {"messages", "completion",
    "desirable"}: one answer, good (desirable) or bad, for KTO."""
    if row.get("completion") in (None, "", []):
        raise RowError("completion", f"missing or empty (row has: {', '.join(row) or 'nothing'})")
    label = row.get("label")
    if not isinstance(label, bool) and label not in (0, 1):
        raise RowError("label", f"must be true (a desirable answer) or false (an undesirable one), got {label!r}")
    prompt = _as_messages(row.get("prompt"), "prompt", "user")
    system = row.get("system")
    if isinstance(system, str) and system.strip() and prompt[0].get("role") != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    return {"messages": prompt, "completion": _as_messages(row["completion"], "completion", "assistant"),
            "desirable": bool(label)}


FORMATS: dict[str, Callable[[dict], dict]] = {
    "openai": openai_map_fn, "alpaca": alpaca_map_fn, "alpaca_zh": alpaca_zh_map_fn, "sharegpt": sharegpt_map_fn,
    "oasst1": oasst1_map_fn, "pretrain": pretrain_map_fn, "msagent": msagent_map_fn, "llava": llava_map_fn,
    "preference": preference_map_fn, "kto": kto_map_fn, "xtuner": xtuner_map_fn,
}

FORMAT_COLUMNS = {
    "openai": "messages [, tools]", "alpaca": "instruction, input, output", "alpaca_zh": "instruction_zh, input_zh, output_zh",
    "sharegpt": "conversations (from/value: human, gpt, system) [, system]", "oasst1": "text with ### Human: / ### Assistant:",
    "pretrain": "text", "msagent": "conversations with <|startofthink|> tool calls",
    "llava": "conversations (from/value) and image or images (LLaVA configs)",
    "preference": "chosen, rejected [, prompt, system]: strings, messages, or whole conversations (HH-RLHF, UltraFeedback)",
    "kto": "prompt, completion, label (true: desirable, false: undesirable) [, system]: one answer, for KTO",
    "xtuner": "conversation: [{system, input, output}, ...] (XTuner's own format)",
}


def detect_format(row: dict) -> str:
    """Which format a row is in, from its columns (for data.format = 'auto')."""
    if "chosen" in row and "rejected" in row:
        return "preference"
    if "completion" in row and "label" in row:
        return "kto"
    if "messages" in row:
        return "openai"
    if "conversation" in row:
        return "xtuner"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "instruction_zh" in row and "output_zh" in row:
        return "alpaca_zh"
    if "conversations" in row:
        turns = row["conversations"] if isinstance(row["conversations"], list) else []
        if any("<|startofthink|>" in str(t.get("value", "")) for t in turns if isinstance(t, dict)):
            return "msagent"
        return "sharegpt"
    if "text" in row:
        return "oasst1" if "### Human:" in str(row["text"]) else "pretrain"
    raise RowError("", f"cannot tell the format from the columns {', '.join(row) or '(none)'}; "
                   f"set data.format to one of {', '.join(FORMATS)}")


def check_messages(messages) -> list[dict]:
    """Validate a conversation; returns it with `loss` flags normalized to bool."""
    if not isinstance(messages, list) or not messages:
        raise RowError("messages", "must be a non-empty list of {role, content}")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RowError(where, f"must be an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise RowError(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        content = message.get("content")
        calls = message.get("tool_calls")
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise RowError(f"{where}.content", f"must be a string, got {type(content).__name__}")
        if role in ("user", "assistant") and not content.strip() and not calls:
            raise RowError(f"{where}.content", "is empty")
        if role == "system" and i != 0:
            raise RowError(f"{where}.role", "a system message may only come first")
        if calls is not None and (role != "assistant" or not isinstance(calls, list)):
            raise RowError(f"{where}.tool_calls", "must be a list, on an assistant message")
        loss = message.get("loss", True)
        if isinstance(loss, str):
            loss = loss.strip().lower() not in ("false", "0", "no")
        item = {"role": role, "content": content, "loss": bool(loss)}
        if calls:
            item["tool_calls"] = calls
        if role == "tool" and isinstance(message.get("tool_call_id"), str):  # Mistral writes it with the result
            item["tool_call_id"] = message["tool_call_id"]
        reasoning = message.get("reasoning_content")
        if reasoning is not None:  # Qwen3's think block (qwen3_chat writes it)
            if role != "assistant" or not isinstance(reasoning, str):
                raise RowError(f"{where}.reasoning_content", "must be a string, on an assistant message")
            item["reasoning_content"] = reasoning
        checked.append(item)
    turns = [m["role"] for m in checked if m["role"] != "system"]
    if not turns or turns[0] != "user":
        raise RowError("messages", f"the first non-system message must be from the user, got {turns[0] if turns else None!r}")
    for i in range(1, len(turns)):
        if turns[i] == turns[i - 1] and turns[i] != "tool":
            raise RowError("messages", f"two {turns[i]!r} messages in a row")
    if "assistant" not in turns:
        raise RowError("messages", "has no assistant message to learn from")
    return checked

"""Map functions: one dataset row -> {"messages": [...]} in the OpenAI conversation format.

A map function raises `RowError(field, message)` for a row it cannot use; the loader
adds the file and line.
"""

from __future__ import annotations

from typing import Callable

ROLES = ("system", "user", "assistant")

ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")


class RowError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"field {field!r}: {message}")
        self.field = field


def openai_map_fn(row: dict) -> dict:
    """Rows already in the OpenAI format are checked and passed on.

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    -> the same messages (a per-message "loss": false keeps an assistant turn out of the loss)
    """
    if "messages" not in row:
        raise RowError("messages", f"missing (row has: {', '.join(row) or 'nothing'})")
    return {"messages": row["messages"]}


def alpaca_map_fn(row: dict) -> dict:
    """{"instruction": "Add", "input": "1 and 2", "output": "3"}
    -> [{"role": "system", "content": ALPACA_SYSTEM},
        {"role": "user", "content": "Add\\n1 and 2"}, {"role": "assistant", "content": "3"}]
    """
    for name in ("instruction", "output"):
        if name not in row:
            raise RowError(name, f"missing (row has: {', '.join(row) or 'nothing'})")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise RowError("input", f"must be a string, got {type(extra).__name__}")
    prompt = f"{row['instruction']}\n{extra}" if extra else row["instruction"]
    return {"messages": [{"role": "system", "content": ALPACA_SYSTEM},
                         {"role": "user", "content": prompt},
                         {"role": "assistant", "content": row["output"]}]}


FORMATS: dict[str, Callable[[dict], dict]] = {"openai": openai_map_fn, "alpaca": alpaca_map_fn}


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
        if not isinstance(content, str):
            raise RowError(f"{where}.content", f"must be a string, got {type(content).__name__}")
        if role != "system" and not content.strip():
            raise RowError(f"{where}.content", "is empty")
        if role == "system" and i != 0:
            raise RowError(f"{where}.role", "a system message may only come first")
        loss = message.get("loss", True)
        if isinstance(loss, str):
            loss = loss.strip().lower() not in ("false", "0", "no")
        checked.append({"role": role, "content": content, "loss": bool(loss)})
    turns = [m["role"] for m in checked if m["role"] != "system"]
    if turns[0] != "user":
        raise RowError("messages", f"the first non-system message must be from the user, got {turns[0]!r}")
    for i in range(1, len(turns)):
        if turns[i] == turns[i - 1]:
            raise RowError("messages", f"two {turns[i]!r} messages in a row")
    if "assistant" not in turns:
        raise RowError("messages", "has no assistant message to learn from")
    return checked

"""XTuner 0.1.x's dataset map functions for the datasets its configs train on, by the same names, so a
config converted by `tuner convert xtuner-config` reads the same rows the same way:

    map_fn=sql_map_fn   # {"context": "CREATE TABLE ...", "question": "...", "answer": "SELECT ..."}

Each gives tuner's conversation ({"messages": [...]}) with XTuner's system prompt for that dataset
(tuner.data.system_templates). The datasets' general shapes (alpaca, oasst1, openai, pretraining text,
msagent, llava, preference pairs) are tuner's own formats (tuner.data.formats), which the converter
names instead of a map function.
"""

from __future__ import annotations

from tuner.data.formats import RowError, _require, _string, preference_map_fn
from tuner.data.system_templates import SYSTEM_TEMPLATES


def _one_turn(system: str | None, user: str, assistant: str) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def code_alpaca_map_fn(row: dict) -> dict:
    """CodeAlpaca: {"prompt", "completion"}, the coder system prompt."""
    _require(row, "prompt", "completion")
    return _one_turn(SYSTEM_TEMPLATES["coder"], _string(row, "prompt"), _string(row, "completion"))


def tiny_codes_map_fn(row: dict) -> dict:
    """nampdn-ai/tiny-codes: {"prompt", "response"}, the coder system prompt."""
    _require(row, "prompt", "response")
    return _one_turn(SYSTEM_TEMPLATES["coder"], _string(row, "prompt"), _string(row, "response"))


def colors_map_fn(row: dict) -> dict:
    """burkelibbey/colors: {"description": "Medium blue: a calm ...", "color": "#1b4f9c"}; the text after
    the first ':' is the question, the colorist system prompt."""
    _require(row, "description", "color")
    description = ":".join(_string(row, "description").split(":")[1:]).strip()
    return _one_turn(SYSTEM_TEMPLATES["colorist"], description, _string(row, "color"))


def crime_kg_assitant_map_fn(row: dict) -> dict:
    """CrimeKgAssitant (XTuner's spelling): {"input", "output"}, the lawyer system prompt."""
    _require(row, "input", "output")
    return _one_turn(SYSTEM_TEMPLATES["lawyer"], _string(row, "input"), _string(row, "output"))


def law_reference_map_fn(row: dict) -> dict:
    """Law references: {"question", "answer"}, the lawyer system prompt."""
    _require(row, "question", "answer")
    return _one_turn(SYSTEM_TEMPLATES["lawyer"], _string(row, "question"), _string(row, "answer"))


def medical_map_fn(row: dict) -> dict:
    """shibing624/medical: {"instruction", "input", "output"} -> "instruction\\ninput", the medical prompt."""
    _require(row, "instruction", "output")
    return _one_turn(SYSTEM_TEMPLATES["medical"], f"{_string(row, 'instruction')}\n{_string(row, 'input')}",
                     _string(row, "output"))


def sql_map_fn(row: dict) -> dict:
    """b-mc2/sql-create-context: {"context", "question", "answer"} -> "context\\nquestion", the SQL prompt."""
    _require(row, "context", "question", "answer")
    return _one_turn(SYSTEM_TEMPLATES["sql"], f"{_string(row, 'context')}\n{_string(row, 'question')}",
                     _string(row, "answer"))


def arxiv_map_fn(row: dict) -> dict:
    """arXiv metadata: the abstract asks for the title, the arxiv_gentile system prompt."""
    _require(row, "abstract", "title")
    return _one_turn(SYSTEM_TEMPLATES["arxiv_gentile"], _string(row, "abstract"), _string(row, "title"))


def openorca_map_fn(row: dict) -> dict:
    """Open-Orca/OpenOrca: {"system_prompt", "question", "response"}."""
    _require(row, "question", "response")
    return _one_turn(_string(row, "system_prompt"), _string(row, "question"), _string(row, "response"))


def stack_exchange_map_fn(row: dict) -> dict:
    """{"question", "response"}."""
    _require(row, "question", "response")
    return _one_turn(None, _string(row, "question"), _string(row, "response"))


def default_map_fn(row: dict) -> dict:
    """{"input", "output"}."""
    _require(row, "input", "output")
    return _one_turn(None, _string(row, "input"), _string(row, "output"))


def wizardlm_map_fn(row: dict) -> dict:
    """WizardLM's ShareGPT-style "conversations": leading "gpt" turns are skipped and consecutive
    "human" turns joined, as XTuner does."""
    _require(row, "conversations")
    turns = list(row["conversations"])
    while turns and turns[0].get("from") == "gpt":
        turns = turns[1:]
    messages, asked = [], ""
    for i, turn in enumerate(turns):
        if turn.get("from") == "human":
            asked += turn.get("value") or ""
        elif turn.get("from") == "gpt":
            messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": turn.get("value") or ""}]
            asked = ""
        else:
            raise RowError(f"conversations[{i}].from", f"must be 'human' or 'gpt', got {turn.get('from')!r}")
    return {"messages": messages}


def orpo_dpo_mix_40k_map_fn(row: dict) -> dict:
    """mlabonne/orpo-dpo-mix-40k: "chosen" and "rejected" whole conversations; the prompt is the
    chosen one's turns before its last answer (XTuner's reading; tuner's preference format)."""
    for name in ("chosen", "rejected"):
        if not isinstance(row.get(name), list) or not row[name]:
            raise RowError(name, "must be a non-empty list of messages")
    return preference_map_fn({"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:],
                              "rejected": row["rejected"][-1:]})


MAP_FNS = {fn.__name__: fn for fn in (
    code_alpaca_map_fn, tiny_codes_map_fn, colors_map_fn, crime_kg_assitant_map_fn, law_reference_map_fn,
    medical_map_fn, sql_map_fn, arxiv_map_fn, openorca_map_fn, stack_exchange_map_fn, default_map_fn,
    wizardlm_map_fn, orpo_dpo_mix_40k_map_fn)}

"""Reward functions for online RL, with TRL's signature, so TRL's work here unchanged and these work in TRL:

    reward(prompts, completions, completion_ids=..., **columns) -> list[float | None]

`prompts[i]` is the row's prompt as given (a string, or messages), `completions[i]` the sampled text (for
message prompts, [{"role": "assistant", "content": text}] as TRL passes it), and every other column of
the data arrives as a keyword list (GSM8K's `answer`, MATH's `solution`). None means "cannot score this
one": it is left out of its group's mean.

Built in, by name in `rl.rewards`:
    'math_accuracy'   1 when the completion's final answer equals the reference's (GSM8K '#### 42',
                      MATH '\\boxed{...}', or an `answer` column), numerically when both are numbers
    'format'          1 when the completion is <think>...</think><answer>...</answer> (format_reward(pattern)
                      for your own)
    'length'          DAPO's soft overlong punishment: 0 up to max_completion_length - 1/4 of it, then down to -1
Yours: a callable in the config, or 'module:function' (the config's folder is importable).
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Callable

from tuner.errors import TunerError

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def completion_text(completion) -> str:
    """The text of a completion as TRL passes it: a string, or [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion)


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces balanced), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def final_answer(text: str) -> str | None:
    """A text's final answer: <answer>...</answer>, '#### x', \\boxed{x}, 'answer is x', else its last number."""
    tagged = re.findall(r"<answer>(.*?)</answer>", text, re.S)
    if tagged:
        return tagged[-1].strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _normalized(answer: str) -> str | float:
    text = answer.strip().strip(".").replace("$", "").replace("\\!", "").replace(" ", "")
    number = text.replace(",", "")
    try:
        return float(number)
    except ValueError:
        found = _NUMBER.fullmatch(number)
        return float(found.group().replace(",", "")) if found else text


def math_accuracy(prompts, completions, answer=None, solution=None, **columns) -> list[float | None]:
    """1.0 when the completion's final answer equals the reference (the `answer` column, GSM8K's '#### N'
    part of it, or MATH's `solution` \\boxed{}), else 0.0; None for a row without a reference."""
    references = answer if answer is not None else solution
    if references is None:
        raise TunerError("math_accuracy needs an `answer` or `solution` column in the data")
    scores = []
    for completion, reference in zip(completions, references):
        wanted = final_answer(str(reference)) if reference is not None else None
        if wanted is None:
            scores.append(None)
            continue
        given = final_answer(completion_text(completion))
        scores.append(1.0 if given is not None and _normalized(given) == _normalized(wanted) else 0.0)
    return scores


THINK_ANSWER = r"<think>.*?</think>\s*<answer>.*?</answer>"


def format_reward(pattern: str = THINK_ANSWER) -> Callable:
    """A reward of 1.0 for completions that match `pattern` whole (DOTALL), else 0.0."""
    compiled = re.compile(pattern, re.S)

    def format(prompts, completions, **columns) -> list[float]:  # noqa: A001 - the name it is logged under
        return [1.0 if compiled.fullmatch(completion_text(c).strip()) else 0.0 for c in completions]

    return format


def soft_overlong_punishment(max_completion_length: int, soft_cache: int | None = None) -> Callable:
    """DAPO's length penalty on completion_ids: 0 up to max - cache tokens, then linearly to -1 at max."""
    cache = soft_cache if soft_cache is not None else max(max_completion_length // 4, 1)

    def length(prompts, completions, completion_ids, **columns) -> list[float]:
        free = max_completion_length - cache
        return [0.0 if len(ids) <= free else max(-1.0, (free - len(ids)) / cache) for ids in completion_ids]

    return length


def resolve_rewards(specs: list, config_dir: Path | None, max_completion_length: int) -> list:
    """The reward functions of rl.rewards: callables as they are, built-in names, 'module:function'
    imported (the config's folder first on the path), and 'rm:PATH' kept as the string (the engine loads
    the reward model). An import that fails says which and why, before any model is loaded."""
    builtins = {"math_accuracy": lambda: math_accuracy, "format": format_reward,
                "length": lambda: soft_overlong_punishment(max_completion_length)}
    resolved = []
    for spec in specs:
        if isinstance(spec, str) and spec.startswith("rm:"):
            folder = spec[3:]
            local = folder.startswith((".", "/", "~")) or folder.count("/") != 1
            if local and not Path(folder).expanduser().is_dir():
                raise TunerError(f"rl.rewards {spec!r}: no reward model folder {folder}",
                                 hint="train one with a preference section method='reward', then tuner convert pth_to_hf")
            resolved.append(spec)
        elif callable(spec):
            resolved.append(spec)
        elif isinstance(spec, str) and spec in builtins:
            resolved.append(builtins[spec]())
        elif isinstance(spec, str) and ":" in spec:
            module_name, _, name = spec.partition(":")
            added = config_dir is not None and str(config_dir) not in sys.path
            if added:
                sys.path.insert(0, str(config_dir))
            try:
                module = importlib.import_module(module_name)
                resolved.append(getattr(module, name))
            except Exception as e:  # noqa: BLE001 - one line naming the reward, whatever went wrong
                raise TunerError(f"rl.rewards: cannot import {spec!r}: {type(e).__name__}: {e}",
                                 hint=f"put {module_name}.py next to the config (or on PYTHONPATH) with a function "
                                      f"{name}(prompts, completions, **columns)") from None
            finally:
                if added:
                    sys.path.remove(str(config_dir))
        else:
            raise TunerError(f"rl.rewards: {spec!r} is not a function, a built-in ({', '.join(builtins)}), "
                             "'module:function' or 'rm:PATH'")
    return resolved


def reward_name(fn) -> str:
    if isinstance(fn, str):
        return fn
    return getattr(fn, "__name__", type(fn).__name__)

"""Writing configs as Python: the one writer of config text, for the resolved config of a run
(`work_dir/resolved_config.py`, which loads back as the same config), the converter of XTuner configs
(convert/xtuner_config.py) and the built-in config library (tools/config_library.py).

    banner("PART 1  Settings")            the XTuner-style section banner
    imports("tuner.config", names)        `from tuner.config import ...`, wrapped at 110 columns
    resolved_text(config)                 every section after --cfg-options, as Python that loads back
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

# XTuner's section banners as its configs (and tuner's) write them: not quite centred.
BANNER_INDENT = {"PART 1  Settings": 26, "PART 2  Model & Tokenizer": 22, "PART 3  Dataset & Dataloader": 22,
                 "PART 4  Scheduler & Optimizer": 20, "PART 5  Runtime": 27}


def banner(title: str) -> str:
    rule, left = "#" * 71, BANNER_INDENT[title]
    return f"{rule}\n#{' ' * left}{title.ljust(69 - left)}#\n{rule}"


def wrapped(head: str, items: list[str]) -> str:
    """head + items joined, wrapped at 110 columns under the opening parenthesis."""
    lines, current = [], head
    for i, item in enumerate(items):
        piece = item + (", " if i < len(items) - 1 else ")")
        if len(current) + len(item) + 2 > 110 and current.strip() != head.strip():  # room for ", " or ")"
            lines.append(current.rstrip())
            current = " " * len(head)
        current += piece
    return "\n".join(lines + [current])


def imports(module: str, names: list[str]) -> str:
    """`from module import (a, b, ...)` wrapped at 110 columns like the built-in configs."""
    one = f"from {module} import {', '.join(names)}"
    return one if len(one) <= 110 else wrapped(f"from {module} import (", names)


def resolved_text(config) -> str:
    """The config after overrides, as Python that builds the same sections when loaded. Functions come
    from where they live: an importable module by import, one written in the config file itself from
    that file (`runpy`, as `tuner train` ran it)."""
    from tuner.config import SECTIONS

    functions: dict[str, Any] = {}
    values = {name: getattr(config, name) for name in SECTIONS}
    body = [f"{name} = {python_repr(value, functions)}" for name, value in values.items()]
    hooks = [python_repr(h, functions) for h in config.custom_hooks]
    lines = [f"# Resolved config of {config.path} (written by tuner train): the sections after --cfg-options.",
             "# It loads back as the same config: tuner train resolved_config.py"]
    used = sorted({type(v).__name__ for v in _dataclasses(values.values())})
    lines.append(imports("tuner.config", used))
    from_config_file = sorted(name for name, fn in functions.items() if _defined_in(fn, config))
    for module in sorted({fn.__module__ for name, fn in functions.items() if name not in from_config_file}):
        lines.append(imports(module, sorted(n for n, fn in functions.items()
                                            if fn.__module__ == module and n not in from_config_file)))
    if from_config_file:  # (the config's own functions: from the config file, as tuner train ran it)
        lines += ["import runpy", f"_config = runpy.run_path({str(config.path)!r})",
                  *[f"{name} = _config[{name!r}]" for name in from_config_file]]
    lines += ["", *body]
    if hooks:
        lines.append(f"custom_hooks = [{', '.join(hooks)}]")
    return "\n".join(lines) + "\n"


def python_repr(value: Any, functions: dict | None = None) -> str:
    """Python source that builds `value`: sections as constructor calls, functions by name (collected in
    `functions`, name -> function, so the caller can import them)."""
    if dataclasses.is_dataclass(value):
        args = ", ".join(f"{f.name}={python_repr(getattr(value, f.name), functions)}" for f in dataclasses.fields(value))
        return f"{type(value).__name__}({args})"
    if isinstance(value, (list, tuple)) and any(dataclasses.is_dataclass(v) or callable(v) for v in value):
        items = ", ".join(python_repr(v, functions) for v in value)
        return f"[{items}]" if isinstance(value, list) else f"({items},)"
    if callable(value):
        name = getattr(value, "__name__", None) or type(value).__name__
        if functions is not None:
            functions[name] = value
        return name
    return repr(value)


def _dataclasses(values) -> list:
    found = []
    for value in values:
        if dataclasses.is_dataclass(value):
            found.append(value)
            found += _dataclasses(getattr(value, f.name) for f in dataclasses.fields(value))
        elif isinstance(value, (list, tuple)):
            found += _dataclasses(value)
    return found


def _defined_in(fn, config) -> bool:
    """Whether `fn` was written in the config file (its module is the config's, or has no file of its own)."""
    module = getattr(fn, "__module__", "") or ""
    if module.startswith("tuner_config_") or module == "__main__":
        return True
    try:
        return inspect.getsourcefile(fn) == str(config.path)
    except TypeError:
        return False

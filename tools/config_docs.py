"""Regenerate the field tables at the end of docs/config.md from tuner/config.py.

    python tools/config_docs.py          # rewrite docs/config.md
    python tools/config_docs.py --check  # exit 1 if docs/config.md is out of date
"""

from __future__ import annotations

import ast
import dataclasses
import sys
import typing
from pathlib import Path

from tuner.config import SECTIONS, DatasetSource, _describe

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "config.md"
MARKER = "## Every field\n"


def field_docs() -> dict[tuple[str, str], str]:
    """The docstring under each field, read from the source."""
    tree = ast.parse((ROOT / "tuner" / "config.py").read_text())
    docs = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for this, after in zip(node.body, node.body[1:]):
                if isinstance(this, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                    docs[(node.name, this.target.id)] = after.value.value
    return docs


def tables() -> str:
    docs, out = field_docs(), []
    for name, cls in [*SECTIONS.items(), ("data.sources[i]", DatasetSource)]:
        out += [f"\n### `{name} = {cls.__name__}(...)`\n", "| field | type | default | meaning |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = repr(f.default_factory())
            else:
                default = "required"
            meaning = docs.get((cls.__name__, f.name), "").replace("|", "\\|")
            out.append(f"| `{f.name}` | `{_describe(hints[f.name])}` | `{default}` | {meaning} |")
    return "\n".join(out) + "\n"


def main() -> int:
    text = DOC.read_text()
    new = text[: text.index(MARKER) + len(MARKER)] + tables()
    if "--check" in sys.argv:
        if new != text:
            print(f"{DOC} is out of date: run python tools/config_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())

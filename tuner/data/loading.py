"""Read rows from local .json / .jsonl files, each with the file and line it came from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from tuner.errors import TunerError


def iter_rows(path: str | Path) -> Iterator[tuple[str, int, dict]]:
    """Yield (file, line, row). A bad line raises TunerError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise TunerError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise TunerError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if path.suffix == ".jsonl":
        yield from _jsonl_rows(path, text)
    elif path.suffix == ".json":
        yield from _json_array_rows(path, text)
    else:
        raise TunerError(f"{path}: unsupported data file type {path.suffix!r}; use .json or .jsonl")


def _jsonl_rows(path: Path, text: str):
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TunerError(f"{path}:{number}: malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise TunerError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
        yield str(path), number, row


def _json_array_rows(path: Path, text: str):
    """A JSON array of objects; decoded element by element to know each one's line."""
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    if pos >= len(text) or text[pos] != "[":
        raise TunerError(f"{path}:1: a .json data file must hold an array of objects (or use .jsonl)")
    pos = _skip_space(text, pos + 1)
    while pos < len(text) and text[pos] != "]":
        line = text.count("\n", 0, pos) + 1
        try:
            row, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise TunerError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise TunerError(f"{path}:{line}: each element must be a JSON object, got {type(row).__name__}")
        yield str(path), line, row
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_space(text, pos + 1)
        elif pos < len(text) and text[pos] != "]":
            line = text.count("\n", 0, pos) + 1
            raise TunerError(f"{path}:{line}: malformed JSON: expected ',' or ']'")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos

"""Read rows from where the data lives, each with the place it came from.

Local .json (an array of objects), .jsonl, .parquet, .csv and .txt files (one row
{"text": line} per non-empty line), folders of them, and Hugging Face datasets by name.
Rows are streamed: a corpus is never held in memory whole.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

from tuner.data.modelscope import download, modelscope_id
from tuner.errors import TunerError

SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt")
BAD_ROW = "__tuner_bad_row__"  # a row that could not be read: {BAD_ROW: message}, skippable like any bad row


def data_files(path: str | Path) -> list[Path]:
    """The files behind a data path: the file itself, or the supported files of a folder (a ModelScope
    dataset's: downloaded first)."""
    repo = modelscope_id(str(path))
    path = download(repo, "dataset") if repo else Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise TunerError(f"data folder {path} holds no {', '.join(SUFFIXES)} files")
        return files
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise TunerError(f"{path}: unsupported data file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
        return [path]
    raise TunerError(f"data file not found: {path}")


def is_hub_dataset(path: str) -> bool:
    """'tatsu-lab/alpaca' is a hub name; './data', 'data.jsonl' and existing paths are local (and a
    ModelScope dataset is read from its downloaded folder)."""
    if modelscope_id(path):
        return False
    return (not Path(path).exists() and path.count("/") == 1 and not path.startswith((".", "/", "~"))
            and Path(path).suffix not in SUFFIXES)


def iter_rows(path: str | Path, split: str = "train", revision: str | None = None,
              subset: str | None = None) -> Iterator[tuple[str, int, dict]]:
    """Yield (place, line, row). A bad line raises TunerError naming file and line. `split`, `revision` and
    `subset` (its configuration name) are a hub dataset's."""
    if is_hub_dataset(str(path)):
        yield from _hub_rows(str(path), split, revision, subset)
        return
    for file in data_files(path):
        reader = {".jsonl": _jsonl_rows, ".json": _json_array_rows, ".parquet": _parquet_rows,
                  ".csv": _csv_rows, ".txt": _text_rows}[file.suffix]
        yield from reader(file)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Lines of a text file, streamed, with UTF-8 errors reported by line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TunerError(f"{path}:{number}: not valid UTF-8 ({e.reason} at column {e.start + 1})") from None


def _jsonl_rows(path: Path):
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            row = {BAD_ROW: f"malformed JSON: {e.msg} (column {e.colno})"}
        if not isinstance(row, dict):
            row = {BAD_ROW: f"each line must be a JSON object, got {type(row).__name__}"}
        yield str(path), number, row


class _JsonText:
    """A .json file read in chunks: `text[pos:]` is what is not consumed yet, and `line` the line of
    `text[pos]`. The buffer is compacted only when more is read, so each byte is copied a bounded
    number of times; memory stays at about one element plus a chunk."""

    CHUNK = 1 << 20

    def __init__(self, path: Path):
        import codecs

        self.path, self.file = path, open(path, "rb")
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text, self.pos, self.line, self.read_bytes, self.eof = "", 0, 1, 0, False

    def more(self, at_least: int = 0) -> bool:
        """Read at least `at_least` more bytes of the file; False at its end."""
        if self.eof:
            return False
        raw = self.file.read(max(at_least, self.CHUNK))
        try:
            decoded = self.decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            offset = self.read_bytes + e.start
            raise TunerError(f"{self.path}:{_line_of_byte(self.path, offset)}: not valid UTF-8 ({e.reason} at "
                             f"byte {offset})") from None
        self.read_bytes += len(raw)
        if not raw:  # the end: positions stay as they are (an error found before may name them)
            self.eof = True
            self.text += decoded
            return False
        self.text, self.pos = self.text[self.pos:] + decoded, 0
        return True

    def consume(self, end: int) -> None:
        """Move past text[pos:end]."""
        self.line += self.text.count("\n", self.pos, end)
        self.pos = end

    def peek(self) -> str:
        """Skip whitespace; the next character, or '' at the end of the file."""
        while True:
            end = self.pos
            while end < len(self.text) and self.text[end] in " \t\r\n":
                end += 1
            self.consume(end)
            if self.pos < len(self.text) or not self.more():
                return self.text[self.pos:self.pos + 1]

    def close(self) -> None:
        self.file.close()


def _line_of_byte(path: Path, offset: int) -> int:
    line = 1
    with open(path, "rb") as f:
        while offset > 0:
            block = f.read(min(offset, 1 << 20))
            if not block:
                break
            line, offset = line + block.count(b"\n"), offset - len(block)
    return line


def _json_array_rows(path: Path):
    """A JSON array of objects, streamed: decoded element by element (so each one's line is known),
    in time linear in the file and memory of about one element."""
    decoder = json.JSONDecoder()
    source = _JsonText(path)
    try:
        if source.peek() != "[":
            raise TunerError(f"{path}:1: a .json data file must hold an array of objects (or use .jsonl)")
        source.consume(source.pos + 1)
        while source.peek() not in ("]", ""):
            wanted = _JsonText.CHUNK
            while True:
                try:
                    row, end = decoder.raw_decode(source.text, source.pos)
                    break
                except json.JSONDecodeError as e:
                    # Cut by the end of the buffer (the error is at its end, or a string runs into it): read
                    # more, in doubling chunks so a long element stays linear; else the element is malformed.
                    cut = e.pos >= len(source.text) - 8 or e.msg.startswith("Unterminated string")
                    if not (cut and source.more(wanted)):
                        line = source.line + source.text.count("\n", source.pos, e.pos)
                        raise TunerError(f"{path}:{line}: malformed JSON: {e.msg}") from None
                    wanted *= 2
            line = source.line
            if not isinstance(row, dict):
                raise TunerError(f"{path}:{line}: each element must be a JSON object, got {type(row).__name__}")
            source.consume(end)
            yield str(path), line, row
            following = source.peek()
            if following == ",":
                source.consume(source.pos + 1)
            elif following == "":
                raise TunerError(f"{path}:{source.line}: malformed JSON: the array is not closed with ']'")
            elif following != "]":
                raise TunerError(f"{path}:{source.line}: malformed JSON: expected ',' or ']'")
        if source.peek() != "]":
            raise TunerError(f"{path}:{source.line}: malformed JSON: the array is not closed with ']'")
    finally:
        source.close()


def _parquet_rows(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a broken file
        raise TunerError(f"{path}: not a readable parquet file: {e}") from None
    number = 0
    for batch in table.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            number += 1
            yield str(path), number, row  # "line" = row number in the file, from 1


def _csv_rows(path: Path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                yield str(path), reader.line_num, dict(row)
        except UnicodeDecodeError as e:
            raise TunerError(f"{path}:{reader.line_num + 1}: not valid UTF-8 ({e.reason})") from None


def _text_rows(path: Path):
    for number, line in _lines(path):
        if line.strip():
            yield str(path), number, {"text": line.rstrip("\n")}


def hub_revision(name: str, revision: str | None = None) -> str:
    """The commit of hub dataset `name` (at `revision`, a branch, tag or commit; None: the default branch)
    that will be read: the hub's answer, or offline the one the local hub cache last saw; `revision`
    itself (or 'unknown') when neither can tell. Part of the tokenized cache's key."""
    from huggingface_hub import HfApi, constants

    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().dataset_info(name, revision=revision, timeout=10).sha or revision or "unknown"
        except Exception:  # noqa: BLE001 - offline, gated, missing: fall back to the local cache
            pass
    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}" / "refs" / (revision or "main")
    return ref.read_text().strip() if ref.is_file() else revision or "unknown"


def _hub_rows(name: str, split: str, revision: str | None = None, subset: str | None = None):
    import datasets

    try:
        dataset = datasets.load_dataset(name, subset, split=split, streaming=True, revision=revision)
    except Exception as e:  # noqa: BLE001 - offline, missing and gated datasets raise many types
        raise TunerError(f"could not load the dataset {name!r} ({f'subset {subset!r}, ' if subset else ''}split "
                         f"{split!r}) from the Hugging Face hub: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}",
                         hint="without network access, download it elsewhere and point data_path at the files") from None
    for number, row in enumerate(dataset, start=1):
        yield f"{name}[{split}]", number, row

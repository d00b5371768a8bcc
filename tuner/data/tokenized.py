"""Tokenize every row once, on every core, into an on-disk store that later runs reuse.

The store is three flat arrays (token ids, trained flags, sample offsets) that are
memory-mapped, so a corpus is held neither twice nor whole in memory. Its folder name is
a hash of everything the tokens depend on: the bytes of the data files, the tokenizer,
the template, the map functions and the settings. Under torchrun every process asks for
the same store; the first one builds it under a file lock and the others wait, saying so.
"""

from __future__ import annotations

import atexit
import hashlib
import inspect
import json
import multiprocessing
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from filelock import FileLock, Timeout

from tuner.config import DataConfig, DatasetSource
from tuner.data.encode import Encoded, prepare, token_bytes, tokenize
from tuner.data.formats import FORMATS, RowError, detect_format, llava_map_fn
from tuner.data.preference import prepare_pair, prepare_unpaired, tokenize_pairs, tokenize_unpaired
from tuner.data.sources import BAD_ROW, data_files, hub_revision, is_hub_dataset, iter_rows
from tuner.data.templates import get_template
from tuner.errors import TunerError

CACHE_VERSION = 2
CHUNK_ROWS = 256
MAX_REPORTED_BAD_ROWS = 5
WAIT_SECONDS = 15  # between "waiting for another process" messages


@dataclass
class TokenStats:
    rows: int = 0
    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_loss: int = 0
    bad_rows: int = 0
    bad_row_examples: list[str] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)
    """source path -> the format used (auto-detected or configured)"""
    source_samples: list[int] = field(default_factory=list)
    """samples per source, in order"""
    pairs: int = 0
    """preference pairs: samples 2k (prompt + chosen) and 2k + 1 (prompt + rejected)"""
    unpaired: int = 0
    """KTO examples (one answer each, desirable or not: desirable.npy)"""

    def add_counts(self, other: "TokenStats") -> None:
        """Add the sample and token counts of `other` (a chunk's, a row's) to these."""
        for name in ("tokens", "trained_tokens", "truncated", "dropped_too_long", "dropped_no_loss", "pairs",
                     "unpaired"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class ImageSettings:
    """LLaVA data: where the image files are (None: beside each data file) and how many tokens an
    image becomes. Samples keep one '<image>' token per image; the expansion happens when batched."""
    folder: str | None
    tokens_per_image: int


class TokenStore:
    """Memory-mapped samples: sample i is ids[offsets[i]:offsets[i+1]]. LLaVA stores also hold each
    sample's image files (images.jsonl, one JSON list per sample, found by byte offset) and image count."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.offsets = np.load(folder / "offsets.npy")
        total = int(self.offsets[-1])
        # np.memmap refuses empty files; an empty store cannot happen (checked when building)
        self.ids = np.memmap(folder / "ids.bin", dtype=np.int32, mode="r", shape=(total,))
        self.trained = np.memmap(folder / "trained.bin", dtype=np.bool_, mode="r", shape=(total,))
        self.stats = TokenStats(**json.loads((folder / "stats.json").read_text()))
        self.n_images = np.load(folder / "n_images.npy") if (folder / "n_images.npy").exists() else None
        self.desirable = np.load(folder / "desirable.npy") if (folder / "desirable.npy").exists() else None
        """KTO: per sample, 1 for a desirable answer, 0 for an undesirable one"""
        if self.n_images is not None:
            self.image_offsets = np.load(folder / "image_offsets.npy")
            size = (folder / "images.jsonl").stat().st_size
            self._images = np.memmap(folder / "images.jsonl", dtype=np.uint8, mode="r", shape=(size,)) if size else None

    def images(self, i: int) -> list[str]:
        if self.n_images is None or not self.n_images[i]:
            return []
        a, b = self.image_offsets[i], self.image_offsets[i + 1]
        return json.loads(bytes(self._images[a:b]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.trained[a:b]


# ---------------------------------------------------------------- the cache key

def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)


def _function_identity(fn: Callable | None) -> str:
    if fn is None:
        return ""
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return f"{fn.__module__}.{getattr(fn, '__qualname__', fn)}"


def cache_key(cfg: DataConfig, tokenizer, images: ImageSettings | None = None) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{CACHE_VERSION}".encode())
    h.update(json.dumps(asdict(images) if images else None).encode())
    for source in cfg.source_list():
        h.update(json.dumps([source.path, source.format, source.split, source.subset,
                             _function_identity(source.map_fn)]).encode())
        if is_hub_dataset(source.path):  # a hub dataset: by its name, split and commit (a new revision re-tokenizes)
            h.update(hub_revision(source.path, source.revision).encode())
            continue
        for file in data_files(source.path):
            h.update(str(file.name).encode())
            _hash_file(h, file)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    h.update(json.dumps([tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token]).encode())
    template = get_template(cfg.template, tokenizer)
    h.update(repr(template if cfg.template else "tokenizer").encode())
    h.update(json.dumps([cfg.system, cfg.max_length, cfg.truncation, cfg.pack_split]).encode())
    return h.hexdigest()


def cache_dir() -> Path:
    from tuner.paths import cache_root
    return Path(os.environ.get("TUNER_DATA_CACHE", cache_root() / "datasets"))


# ---------------------------------------------------------------- tokenizing

# Set in the parent before forking workers, so nothing large is pickled per chunk.
_WORKER: dict = {}


@dataclass
class EncodedChunk:
    """What a worker sends back for one chunk of rows: the kept samples as three flat arrays (a few
    pickles per chunk, not two arrays per row), the bad rows, and the counts of what was dropped."""
    ids: np.ndarray  # int32, the kept samples one after another
    trained: np.ndarray  # bool
    lengths: np.ndarray  # int64, one per kept sample
    kept: np.ndarray  # int32, positions in the chunk of the kept rows
    bad: list[tuple[str, int, str]]  # (place, line, message), in order
    counts: TokenStats
    desirable: np.ndarray | None = None  # KTO: int8 per kept sample, 1 / 0 (-1: not a KTO example)
    image_lines: list[bytes] | None = None  # LLaVA: each kept sample's image files, one JSON line
    n_images: list[int] | None = None  # LLaVA: each kept sample's number of images


def _encode_chunk(chunk: list[tuple[str, int, dict, str]]) -> EncodedChunk:
    """[(place, line, row, map key)] -> the chunk's kept samples, bad rows and counts."""
    tokenizer, template, cfg, map_fns = (_WORKER[k] for k in ("tokenizer", "template", "cfg", "map_fns"))
    images = _WORKER.get("images")
    # pack_split: a long document continues in the next sequence, so it is not cut here
    max_length = None if cfg.pack_split else cfg.max_length
    good, positions, pairs, pair_positions, bad = [], [], [], [], []
    unpaired, unpaired_positions, desirable = [], [], {}
    for position, (place, line, row, key) in enumerate(chunk):
        if BAD_ROW in row:
            bad.append((place, line, row[BAD_ROW]))
            continue
        try:
            mapped = map_fns[key](row)
            if images is not None:
                mapped = _with_image_files(mapped, place, images)
            if isinstance(mapped, dict) and "chosen" in mapped:  # a preference pair: two samples
                pairs.append(prepare_pair(mapped, template, cfg.system))
                pair_positions.append(position)
            elif isinstance(mapped, dict) and "completion" in mapped:  # KTO: one answer, desirable or not
                unpaired.append(prepare_unpaired(mapped, template, cfg.system))
                unpaired_positions.append(position)
                desirable[position] = int(bool(mapped.get("desirable")))
            else:
                good.append(prepare(mapped, template, cfg.system))
                positions.append(position)
        except RowError as e:
            bad.append((place, line, str(e)))
        except (KeyError, TypeError, AttributeError, ValueError) as e:  # a user's map function tripping on a row
            bad.append((place, line, f"map function failed: {e!r}"))
    counts = TokenStats()
    made = {position: [item] for position, item in zip(positions, tokenize(good, tokenizer, max_length))}
    made.update(zip(pair_positions, tokenize_pairs(pairs, tokenizer, max_length)))
    made.update((p, [e]) for p, e in zip(unpaired_positions, tokenize_unpaired(unpaired, tokenizer, max_length)))
    kept, samples = [], []
    for position in sorted(made):
        items, trial = made[position], TokenStats()
        keeps = [_keep(item, cfg, trial, images) for item in items]
        if len(items) == 2 and not all(keeps):  # a pair goes whole or not at all
            counts.dropped_too_long += bool(trial.dropped_too_long)
            counts.dropped_no_loss += not trial.dropped_too_long
            continue
        counts.add_counts(trial)
        for item, keep in zip(items, keeps):
            if keep:
                kept.append(position)
                samples.append(item)
        counts.pairs += len(items) == 2
        counts.unpaired += position in desirable and keeps[0]
    image_lines = n_images = None
    if images is not None:
        image_lines = [(json.dumps(item.images, ensure_ascii=False) + "\n").encode() if item.images else b""
                       for item in samples]
        n_images = [len(item.images or []) for item in samples]
    return EncodedChunk(
        ids=np.concatenate([item.ids for item in samples]) if samples else np.zeros(0, np.int32),
        trained=np.concatenate([item.trained for item in samples]) if samples else np.zeros(0, bool),
        lengths=np.fromiter((len(item.ids) for item in samples), dtype=np.int64, count=len(samples)),
        kept=np.asarray(kept, dtype=np.int32), bad=bad, counts=counts, image_lines=image_lines, n_images=n_images,
        desirable=np.asarray([desirable.get(p, -1) for p in kept], dtype=np.int8) if desirable else None)


def _with_image_files(mapped: dict, place: str, images: ImageSettings) -> dict:
    """The row's image names as files (in the image folder, or beside the data file), each one there."""
    folder = Path(images.folder) if images.folder else Path(place).parent
    paths = [str(folder / name) for name in mapped.get("images") or []]
    missing = next((p for p in paths if not Path(p).is_file()), None)
    if missing:
        raise RowError("image", f"file not found: {missing}")
    return {**mapped, "images": paths}


def _places(source: DatasetSource) -> list[str]:
    """The files (or the hub dataset) behind one source, as `iter_rows` names them."""
    if is_hub_dataset(source.path):
        return [source.path]
    return [str(f) for f in data_files(source.path)]


def resolve_map_fns(cfg: DataConfig, stats: TokenStats, images: bool = False) -> dict[str, Callable]:
    """{"index|file": map function}; an 'auto' format is detected from each file's first row (LLaVA's
    format for image data)."""
    map_fns = {}
    for index, source in enumerate(cfg.source_list()):
        for place in _places(source):
            if source.map_fn is not None:
                fn, label = source.map_fn, f"map_fn {getattr(source.map_fn, '__name__', 'custom')}"
            elif images and source.format == "auto":
                fn, label = llava_map_fn, "llava"
            elif source.format != "auto":
                fn, label = FORMATS[source.format], source.format
            else:
                first = next((r for r in iter_rows(place, source.split, source.revision, source.subset) if BAD_ROW not in r[2]), None)
                if first is None:
                    continue  # no readable row to map: the bad ones are reported when tokenizing
                where, line, row = first
                try:
                    fmt = detect_format(row)
                except RowError as e:
                    raise TunerError(f"{where}:{line}: {e}") from None
                fn, label = FORMATS[fmt], f"{fmt} (detected)"
            map_fns[f"{index}|{place}"] = fn
            stats.formats[place] = label
    return map_fns


def rows_of(cfg: DataConfig) -> Iterator[tuple[int, tuple[str, int, dict, str]]]:
    """(source index, (place, line, row, map function key)) for every row of every source."""
    for index, source in enumerate(cfg.source_list()):
        for place in _places(source):
            for where, line, row in iter_rows(place, source.split, source.revision, source.subset):
                yield index, (where, line, row, f"{index}|{place}")


def _chunks(rows, size):
    rows = iter(rows)
    while chunk := list(islice(rows, size)):
        yield chunk


def tokenize_rows(cfg: DataConfig, tokenizer, folder: Path, progress: Callable[[int], None] | None = None,
                  images: ImageSettings | None = None) -> None:
    """Tokenize every source into `folder` (ids.bin, trained.bin, offsets.npy, stats.json; with images
    also images.jsonl, image_offsets.npy, n_images.npy)."""
    template = get_template(cfg.template, tokenizer)
    stats = TokenStats()
    _WORKER.update(tokenizer=tokenizer, template=template, cfg=cfg, images=images,
                   map_fns=resolve_map_fns(cfg, stats, images is not None))
    ends, total, desirable = [], 0, []
    image_offsets, image_bytes, n_images = [0], 0, []
    source_of_chunk: list[list[int]] = []
    per_source = [0] * len(cfg.source_list())

    def chunk_stream():
        for chunk in _chunks(rows_of(cfg), CHUNK_ROWS):
            source_of_chunk.append([i for i, _ in chunk])
            yield [item for _, item in chunk]

    processes = cfg.num_proc or os.cpu_count() or 1
    token_bytes(tokenizer)  # worked out here once, not in each forked worker
    pool = multiprocessing.get_context("fork").Pool(processes) if processes > 1 else None
    results = pool.imap(_encode_chunk, chunk_stream()) if pool else map(_encode_chunk, chunk_stream())
    try:
        with open(folder / "ids.bin", "wb") as ids_file, open(folder / "trained.bin", "wb") as trained_file, \
                open(folder / "images.jsonl", "wb") as images_file:
            for chunk_index, encoded in enumerate(results):
                sources = source_of_chunk[chunk_index]
                source_of_chunk[chunk_index] = None  # (read once)
                stats.rows += len(sources)
                for place, line, message in encoded.bad:
                    if not cfg.skip_bad_rows:
                        raise TunerError(f"{place}:{line}: {message}",
                                         hint="fix the row, or set data.skip_bad_rows=True to skip and count such rows")
                    stats.bad_rows += 1
                    if len(stats.bad_row_examples) < MAX_REPORTED_BAD_ROWS:
                        stats.bad_row_examples.append(f"{place}:{line}: {message}")
                stats.add_counts(encoded.counts)
                ids_file.write(encoded.ids.tobytes())
                trained_file.write(encoded.trained.tobytes())
                ends.append(total + np.cumsum(encoded.lengths))
                desirable.append(encoded.desirable if encoded.desirable is not None
                                 else np.full(len(encoded.lengths), -1, np.int8))
                total += int(encoded.lengths.sum())
                for position in encoded.kept:
                    per_source[sources[position]] += 1
                if images is not None:
                    for line in encoded.image_lines:
                        images_file.write(line)
                        image_bytes += len(line)
                        image_offsets.append(image_bytes)
                    n_images.extend(encoded.n_images)
                if progress:
                    progress(stats.rows)
    finally:
        if pool:
            pool.terminate()
        _WORKER.clear()
    offsets = np.concatenate([np.zeros(1, np.int64), *ends])
    stats.samples = len(offsets) - 1
    stats.source_samples = per_source
    if stats.samples == 0:
        raise TunerError("no usable sample in the data: " + (
            f"{stats.bad_rows} bad rows, " if stats.bad_rows else "") +
            f"{stats.dropped_no_loss} without a trainable token, {stats.dropped_too_long} too long")
    if stats.pairs and 2 * stats.pairs != stats.samples:
        raise TunerError(f"the data mixes {stats.pairs} preference pairs with {stats.samples - 2 * stats.pairs} "
                         "conversations or texts: train them in separate runs (SFT first, then preference training)")
    if stats.unpaired and (stats.unpaired != stats.samples or stats.pairs):
        raise TunerError(f"the data mixes {stats.unpaired} KTO examples (prompt / completion / label) with "
                         f"{stats.samples - stats.unpaired} samples of other kinds: train them in separate runs")
    if stats.unpaired:
        np.save(folder / "desirable.npy", np.concatenate(desirable))
    np.save(folder / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    if images is not None:
        np.save(folder / "image_offsets.npy", np.asarray(image_offsets, dtype=np.int64))
        np.save(folder / "n_images.npy", np.asarray(n_images, dtype=np.int32))
    (folder / "stats.json").write_text(json.dumps(asdict(stats)))


def _keep(item: Encoded, cfg: DataConfig, stats: TokenStats, images: ImageSettings | None = None) -> bool:
    if images is not None and item.images:  # each image becomes tokens_per_image tokens when batched
        expanded = len(item.ids) + len(item.images) * (images.tokens_per_image - 1)
        if item.truncated or expanded > cfg.max_length:  # cutting through an image would break it
            stats.dropped_too_long += 1
            return False
    if item.truncated and cfg.truncation == "drop":
        stats.dropped_too_long += 1
        return False
    trained = int(item.trained[1:].sum())  # the first token is never a target
    if not trained:
        stats.dropped_no_loss += 1
        return False
    stats.truncated += item.truncated
    stats.tokens += len(item.ids)
    stats.trained_tokens += trained
    return True


def load_token_store(cfg: DataConfig, tokenizer, say: Callable[[str], None] = print,
                     images: ImageSettings | None = None) -> tuple[TokenStore, bool]:
    """The store for this data config, built now or read from the cache. Returns (store, from_cache)."""
    if not cfg.cache:
        folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"tuner-tokens-{os.getpid()}-{time.time_ns()}"
        folder.mkdir(parents=True)
        # the store is read while training: removed when this process ends (or now, if tokenizing fails)
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        tokenize_rows(cfg, tokenizer, folder, images=images)
        return TokenStore(folder), False
    key = cache_key(cfg, tokenizer, images)
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    folder, progress_file = root / key, root / f"{key}.progress"
    if (folder / "stats.json").exists():
        return TokenStore(folder), True
    lock = FileLock(str(root / f"{key}.lock"))
    while True:
        try:
            lock.acquire(timeout=WAIT_SECONDS)
            break
        except Timeout:  # another process (another rank on this machine) is tokenizing
            done = progress_file.read_text().strip() if progress_file.exists() else "0"
            say(f"waiting for another process to tokenize the data ({done} rows so far); cache {folder}")
    try:
        if (folder / "stats.json").exists():
            return TokenStore(folder), True
        tmp = root / f"{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tokenize_rows(cfg, tokenizer, tmp, progress=lambda n: progress_file.write_text(str(n)), images=images)
        os.replace(tmp, folder)
    finally:
        progress_file.unlink(missing_ok=True)
        lock.release()
    return TokenStore(folder), False

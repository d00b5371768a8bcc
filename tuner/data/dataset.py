"""From files to training sequences: rows -> messages -> text -> token ids + labels -> packed.

    row      {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    text     "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nYo<|im_end|>\\n"
    ids      [1, 4093, 198, 17155, 2, 198, 1, 520, 9531, 198, 56, 94, 2, 198]
    labels   [-100, ...,                                       56, 94, 2, 198]   (only the reply)
    packed   several samples back to back in one max_length row, position_ids restarting at 0
             for each, which the model uses to keep them from attending to each other.
"""

from __future__ import annotations

import bisect
import random
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from tuner.config import DataConfig
from tuner.data.encode import IGNORE, encode_conversation
from tuner.data.tokenized import TokenStats, TokenStore, load_token_store

Piece = tuple[int, int, int]  # (sample index, start, end): a slice of one sample in a sequence


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.position_ids:
            self.position_ids = list(range(len(self.input_ids)))


def encode(messages: list[dict], tokenizer, template, max_length: int) -> tuple[Sample, bool]:
    """One conversation as a Sample (labels keep only trained tokens), and whether it was truncated."""
    encoded = encode_conversation(messages, tokenizer, template, max_length)
    labels = np.where(encoded.trained, encoded.ids, IGNORE).tolist()
    labels[0] = IGNORE  # nothing predicts a sample's first token
    return Sample(encoded.ids.tolist(), labels), encoded.truncated


# ---------------------------------------------------------------- which samples, how often

def sample_order(stats: TokenStats, sources_repeats: list[float], seed: int) -> list[int]:
    """Sample indices for one epoch of mixed sources: repeats 2.0 lists a source twice, 0.5 a seeded half."""
    order, start = [], 0
    rng = random.Random(seed)
    for count, repeats in zip(stats.source_samples, sources_repeats):
        indices = list(range(start, start + count))
        whole, fraction = int(repeats), repeats - int(repeats)
        order += indices * whole + sorted(rng.sample(indices, round(fraction * count)))
        start += count
    return order


# ---------------------------------------------------------------- packing plans

def pack_best_fit(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: each sample goes whole into the fullest sequence it still fits.

    lengths [6, 3, 5, 2] at max_length 8 -> [[0, 3], [1, 2]] (6+2 and 3+5)
    """
    bins: list[list[int]] = []
    free_values: list[int] = []  # sorted distinct free capacities that some bin has
    bins_with_free: dict[int, list[int]] = defaultdict(list)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        at = bisect.bisect_left(free_values, n)
        if at == len(free_values):  # no open sequence has room: start one
            bins.append([i])
            b, free = len(bins) - 1, max_length - n
        else:
            old = free_values[at]
            b = bins_with_free[old].pop()
            if not bins_with_free[old]:
                free_values.pop(at)
            bins[b].append(i)
            free = old - n
        if free > 0:
            if not bins_with_free[free]:
                bisect.insort(free_values, free)
            bins_with_free[free].append(b)
    return [sorted(members) for members in bins]  # the data's own order inside a sequence


def pack_split(lengths: list[int], max_length: int) -> list[list[Piece]]:
    """Concatenate samples and cut every max_length tokens; a sample may continue in the next one.

    lengths [5, 6] at max_length 4 -> [[(0,0,4)], [(0,4,5), (1,0,3)], [(1,3,6)]]
    """
    sequences, current, room = [], [], max_length
    for i, n in enumerate(lengths):
        start = 0
        while start < n:
            take = min(room, n - start)
            current.append((i, start, start + take))
            start += take
            room -= take
            if room == 0:
                sequences.append(current)
                current, room = [], max_length
    if current:
        sequences.append(current)
    return sequences


class SequenceDataset:
    """Training sequences built on demand from the token store and a packing plan."""

    def __init__(self, store: TokenStore, plan: list[list[Piece]]):
        self.store, self.plan = store, plan

    def __len__(self) -> int:
        return len(self.plan)

    def num_tokens(self, k: int) -> int:
        return sum(end - start for _, start, end in self.plan[k])

    def __getitem__(self, k: int) -> Sample:
        ids, labels, positions = [], [], []
        for i, start, end in self.plan[k]:
            sample_ids, trained = self.store.sample(i)
            piece_ids = sample_ids[start:end].tolist()
            piece_labels = np.where(trained[start:end], sample_ids[start:end], IGNORE).tolist()
            piece_labels[0] = IGNORE  # nothing in this sequence predicts a piece's first token
            ids += piece_ids
            labels += piece_labels
            positions += range(end - start)
        return Sample(ids, labels, positions)


@dataclass
class DataReport:
    stats: TokenStats
    sequences: int
    packing_efficiency: float
    from_cache: bool
    histogram: list[tuple[int, int]]
    """(length up to, samples) per power-of-two bucket"""

    def summary(self) -> str:
        s = self.stats
        pairs = f" ({s.pairs} preference pairs)" if s.pairs else ""
        text = (f"{s.rows} rows -> {s.samples} samples{pairs}, {s.tokens} tokens ({s.trained_tokens} trained), "
                f"{s.truncated} truncated, {s.dropped_too_long} dropped as too long, "
                f"{s.dropped_no_loss} dropped (no trainable token)")
        if s.bad_rows:
            text += f", {s.bad_rows} bad rows skipped (first: {s.bad_row_examples[0]})"
        text += f"; {self.sequences} sequences, packing efficiency {self.packing_efficiency:.1%}"
        text += " (from cache)" if self.from_cache else ""
        return text

    def details(self) -> str:
        formats = ", ".join(f"{path}: {fmt}" for path, fmt in self.stats.formats.items())
        buckets = "  ".join(f"<={edge}: {count}" for edge, count in self.histogram)
        return f"formats: {formats}\nsample lengths: {buckets}"


def length_histogram(lengths: np.ndarray) -> list[tuple[int, int]]:
    """Samples per length bucket (0-16], (16-32], (32-64] ... up to the longest."""
    edges = [0, 16]
    while edges[-1] < lengths.max():
        edges.append(edges[-1] * 2)
    counts, _ = np.histogram(lengths, bins=np.asarray(edges) + 0.5)
    return list(zip(edges[1:], counts.tolist()))


def build_sequences(cfg: DataConfig, tokenizer, seed: int = 0, say=print) -> tuple[SequenceDataset, DataReport]:
    """The training sequences for a data config, and what happened on the way."""
    store, from_cache = load_token_store(cfg, tokenizer, say)
    order = sample_order(store.stats, [s.repeats for s in cfg.source_list()], seed)
    lengths = store.lengths
    if cfg.pack and cfg.pack_split:
        flat = pack_split([int(lengths[i]) for i in order], cfg.max_length)
        plan = [[(order[i], a, b) for i, a, b in seq] for seq in flat]
    elif cfg.pack:
        groups = pack_best_fit([int(lengths[i]) for i in order], cfg.max_length)
        plan = [[(order[j], 0, int(lengths[order[j]])) for j in group] for group in groups]
    else:
        plan = []
        for i in order:  # unpacked: a sample longer than max_length (pack_split) is cut in pieces
            n = int(lengths[i])
            plan += [[(i, a, min(a + cfg.max_length, n))] for a in range(0, n, cfg.max_length)]
    tokens = sum(b - a for seq in plan for _, a, b in seq)
    efficiency = tokens / (len(plan) * cfg.max_length) if cfg.pack else 1.0
    report = DataReport(store.stats, len(plan), efficiency, from_cache, length_histogram(lengths))
    return SequenceDataset(store, plan), report


def collate(batch: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence. No attention mask: padding is one more segment whose
    position ids restart at 0, so real tokens never attend to it and it carries no loss."""
    width = max(len(s.input_ids) for s in batch)
    ids, labels, positions = [], [], []
    for s in batch:
        pad = width - len(s.input_ids)
        ids.append(s.input_ids + [pad_id] * pad)
        labels.append(s.labels + [IGNORE] * pad)
        positions.append(s.position_ids + list(range(pad)))
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions)}

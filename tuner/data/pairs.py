"""Preference pairs as training sequences: samples 2k (prompt + chosen) and 2k + 1 (prompt + rejected)
of the token store.

Unpacked, each answer is its own row, as TRL batches them. Packed, whole pairs share a row, each
sample with its own positions (so no sample sees another, chosen and rejected of one pair included)
and `sample_ids` saying which pair and answer each token belongs to: 2p for pair p's chosen, 2p + 1
for its rejected, -1 for padding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from tuner.config import DataConfig
from tuner.data.dataset import IGNORE, DataReport, length_histogram, pack_best_fit
from tuner.data.tokenized import TokenStore, load_token_store
from tuner.errors import TunerError


@dataclass
class PairSample:
    """One training sequence: its pairs' samples, each (ids, labels, answer, pair) with answer 0 (chosen)
    or 1 and the pair's index in the data."""
    parts: list[tuple[list[int], list[int], int, int]]
    packed: bool


def pair_order(store: TokenStore, sources_repeats: list[float], seed: int) -> list[int]:
    """Pair indices for one epoch of mixed sources (repeats 2.0 lists a source twice, 0.5 a seeded half)."""
    return source_order([count // 2 for count in store.stats.source_samples], sources_repeats, seed)


def source_order(counts: list[int], sources_repeats: list[float], seed: int) -> list[int]:
    """Indices 0.. of the units (pairs, examples) of consecutive sources with `counts` units each, for one
    epoch: each source's listed `repeats` times (a fraction: a seeded share of it)."""
    order, start = [], 0
    rng = random.Random(seed)
    for count, repeats in zip(counts, sources_repeats):
        indices = list(range(start, start + count))
        whole, fraction = int(repeats), repeats - int(repeats)
        order += indices * whole + sorted(rng.sample(indices, round(fraction * len(indices))))
        start += count
    return order


class PairSequences:
    """Training sequences of whole pairs, built on demand from the token store."""

    def __init__(self, store: TokenStore, plan: list[list[int]], packed: bool):
        self.store, self.plan, self.packed = store, plan, packed
        self.lengths = store.lengths

    def __len__(self) -> int:
        return len(self.plan)

    def num_tokens(self, k: int) -> int:
        return int(sum(self.lengths[2 * p] + self.lengths[2 * p + 1] for p in self.plan[k]))

    def __getitem__(self, k: int) -> PairSample:
        parts = []
        for p in self.plan[k]:
            for answer in (0, 1):
                ids, trained = self.store.sample(2 * p + answer)
                labels = np.where(trained, ids, IGNORE)
                labels[0] = IGNORE  # nothing predicts a sample's first token
                parts.append((ids.tolist(), labels.tolist(), answer, p))
        return PairSample(parts, self.packed)

    def collate(self, batch: list[PairSample], pad_id: int) -> dict[str, torch.Tensor]:
        return collate_pairs(batch, pad_id)


def collate_pairs(batch: list[PairSample], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, labels, position_ids and sample_ids, padded to the longest row (pairs numbered
    through the micro-batch in order), and pair_index: each pair's index in the data."""
    rows, pair, pair_index = [], -1, []
    for sample in batch:
        row = None
        for ids, labels, answer, index in sample.parts:
            if answer == 0:  # each pair's chosen answer comes first
                pair += 1
                pair_index.append(index)
            if row is None or not sample.packed:
                row = ([], [], [], [])
                rows.append(row)
            row[0].extend(ids)
            row[1].extend(labels)
            row[2].extend(range(len(ids)))
            row[3].extend([2 * pair + answer] * len(ids))
    width = max(len(r[0]) for r in rows)
    out = {name: [] for name in ("input_ids", "labels", "position_ids", "sample_ids")}
    for ids, labels, positions, slots in rows:
        pad = width - len(ids)
        out["input_ids"].append(ids + [pad_id] * pad)
        out["labels"].append(labels + [IGNORE] * pad)
        out["position_ids"].append(positions + list(range(pad)))
        out["sample_ids"].append(slots + [-1] * pad)
    out["pair_index"] = pair_index
    return {k: torch.tensor(v) for k, v in out.items()}


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int, prefix: str = "") -> dict[str, list]:
    """(ids, labels) rows, one sample each (sample id = row), right-padded to the longest: input_ids,
    labels, position_ids and sample_ids (-1 on padding), each name after `prefix`."""
    width = max(len(ids) for ids, _ in rows)
    out = {f"{prefix}{k}": [] for k in ("input_ids", "labels", "position_ids", "sample_ids")}
    for i, (ids, labels) in enumerate(rows):
        pad = width - len(ids)
        out[f"{prefix}input_ids"].append(ids + [pad_id] * pad)
        out[f"{prefix}labels"].append(labels + [IGNORE] * pad)
        out[f"{prefix}position_ids"].append(list(range(width)))
        out[f"{prefix}sample_ids"].append([i] * len(ids) + [-1] * pad)
    return out


def build_pair_sequences(cfg: DataConfig, tokenizer, seed: int = 0, say=print) -> tuple[PairSequences, DataReport]:
    store, from_cache = load_token_store(cfg, tokenizer, say)
    if not store.stats.pairs:
        raise TunerError("the config has a preference section but its data holds no chosen / rejected pairs",
                         hint="give rows with 'chosen' and 'rejected' (tuner list-dataset-format), or remove "
                              "the preference section to train on the answers themselves")
    if cfg.pack_split:
        raise TunerError("data.pack_split cuts samples across sequences; a preference pair must stay whole",
                         hint="set data.pack_split=False")
    order = pair_order(store, [s.repeats for s in cfg.source_list()], seed)
    lengths = store.lengths
    pair_lengths = [int(lengths[2 * p] + lengths[2 * p + 1]) for p in order]
    if cfg.pack:
        plan = [[order[j] for j in group] for group in pack_best_fit(pair_lengths, cfg.max_length)]
        efficiency = sum(pair_lengths) / (len(plan) * cfg.max_length)
    else:
        plan, efficiency = [[p] for p in order], 1.0
    report = DataReport(store.stats, len(plan), efficiency, from_cache, length_histogram(lengths))
    return PairSequences(store, plan, cfg.pack), report

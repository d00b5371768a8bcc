"""KTO's training sequences: single answers, each desirable or not, one per row, and each row's KL
sequence (its prompt followed by the answer of the row before it in the micro-batch).

    rows       prompt 0 + answer 0,   prompt 1 + answer 1,   prompt 2 + answer 2
    KL rows    prompt 0 + answer 2,   prompt 1 + answer 0,   prompt 2 + answer 1

KTO (Ethayarajh et al. 2024) compares each answer's reward with the policy's KL divergence from the
reference, estimated on such mismatched prompt / answer pairs; TRL 1.16 makes them the same way
(within each batch, each prompt with the previous example's answer). Data in the `kto` format gives
the examples; preference pairs can be used too, each split into its chosen answer (desirable) and its
rejected one (undesirable), as TRL's `unpair_preference_dataset` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tuner.config import DataConfig
from tuner.data.dataset import IGNORE, DataReport, length_histogram
from tuner.data.pairs import pad_rows, pair_order, source_order
from tuner.data.tokenized import TokenStore, load_token_store
from tuner.errors import TunerError


@dataclass
class KtoExample:
    ids: list[int]
    labels: list[int]
    start: int  # the answer's first token
    desirable: bool


class KtoSequences:
    kl_rows = True
    """the loop gives `collate` each example's KL answer (engine/batches.py: the one before it in the step)"""

    def __init__(self, store: TokenStore, order: list[int], desirable: np.ndarray):
        self.store, self.order, self.desirable = store, order, desirable
        self.lengths = store.lengths

    def __len__(self) -> int:
        return len(self.order)

    def num_tokens(self, k: int) -> int:
        return int(self.lengths[self.order[k]])

    def __getitem__(self, k: int) -> KtoExample:
        i = self.order[k]
        ids, trained = self.store.sample(i)
        labels = np.where(trained, ids, IGNORE)
        labels[0] = IGNORE
        start = int(np.argmax(trained)) if trained.any() else len(ids)
        return KtoExample(ids.tolist(), labels.tolist(), start, bool(self.desirable[i]))

    def collate(self, batch: list[KtoExample], pad_id: int,
                kl_answers: list[KtoExample] | None = None) -> dict[str, torch.Tensor]:
        return collate_kto(batch, pad_id, kl_answers)


def collate_kto(batch: list[KtoExample], pad_id: int,
                kl_answers: list[KtoExample] | None = None) -> dict[str, torch.Tensor]:
    """The rows (input_ids, labels, position_ids, sample_ids: row i is sample i), `desirable`, and the
    KL rows (kl_input_ids, ...): row i's prompt with the answer of kl_answers[i] (by default row i-1's,
    the last row's for row 0)."""
    if kl_answers is None and len(batch) < 2:
        raise ValueError("a KTO batch of one example has no other answer for its KL row")
    rows = [(e.ids, e.labels) for e in batch]
    before = kl_answers if kl_answers is not None else batch[-1:] + batch[:-1]
    kl_rows = [(e.ids[:e.start] + b.ids[b.start:], [IGNORE] * e.start + b.labels[b.start:])
               for e, b in zip(batch, before)]
    out = {**pad_rows(rows, pad_id), **pad_rows(kl_rows, pad_id, "kl_")}
    out["desirable"] = [e.desirable for e in batch]
    return {k: torch.tensor(v) for k, v in out.items()}


def build_kto_sequences(cfg: DataConfig, tokenizer, seed: int = 0, say=print) -> tuple[KtoSequences, DataReport]:
    store, from_cache = load_token_store(cfg, tokenizer, say)
    if store.desirable is not None:
        desirable = store.desirable.astype(bool)
    elif store.stats.pairs:  # each pair: its chosen answer desirable, its rejected one not
        desirable = np.arange(len(store)) % 2 == 0
    else:
        raise TunerError("preference.method='kto' needs answers marked desirable or not, or preference pairs",
                         hint="give rows with prompt / completion / label (tuner list-dataset-format: kto), or "
                              "chosen / rejected pairs")
    if store.stats.pairs:
        pairs = pair_order(store, [s.repeats for s in cfg.source_list()], seed)
        order = [2 * p + answer for p in pairs for answer in (0, 1)]
    else:
        order = source_order(store.stats.source_samples, [s.repeats for s in cfg.source_list()], seed)
    if len(order) < 2:
        raise TunerError(f"KTO needs at least 2 examples (each one's KL row takes another's answer); the data "
                         f"has {len(order)}")
    report = DataReport(store.stats, len(order), 1.0, from_cache, length_histogram(store.lengths))
    return KtoSequences(store, order, desirable), report


"""From files to training sequences: rows -> messages -> text -> token ids + labels -> packed.

    row      {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    text     "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nYo<|im_end|>\\n"
    ids      [1, 4093, 198, 17155, 2, 198, 1, 520, 9531, 198, 56, 94, 2, 198]
    labels   [-100, ...,                                       56, 94, 2, 198]   (only the reply)
    packed   several samples back to back in one max_length row, position_ids restarting at 0
             for each, which the model uses to keep them from attending to each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tuner.config import DataConfig
from tuner.data.formats import FORMATS, RowError, check_messages
from tuner.data.loading import iter_rows
from tuner.data.templates import get_template
from tuner.errors import TunerError

IGNORE = -100


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.position_ids:
            self.position_ids = list(range(len(self.input_ids)))


@dataclass
class DataStats:
    rows: int = 0
    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped_no_loss: int = 0
    sequences: int = 0
    packing_efficiency: float = 1.0

    def summary(self) -> str:
        return (f"{self.rows} rows -> {self.samples} samples, {self.tokens} tokens ({self.trained_tokens} trained), "
                f"{self.truncated} truncated, {self.dropped_no_loss} dropped (no trainable token); "
                f"{self.sequences} sequences, packing efficiency {self.packing_efficiency:.1%}")


def encode(messages: list[dict], tokenizer, template, max_length: int) -> tuple[Sample, bool]:
    """Render and tokenize one conversation; labels keep only the trainable spans."""
    rendered = template.render(messages)
    encoding = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    labels = [IGNORE] * len(ids)
    span_index = 0
    for i, (start, _end) in enumerate(offsets):
        while span_index < len(rendered.spans) and start >= rendered.spans[span_index][1]:
            span_index += 1
        if span_index < len(rendered.spans) and rendered.spans[span_index][0] <= start:
            labels[i] = ids[i]
    labels[0] = IGNORE  # nothing predicts a sample's first token, also when it is packed after another
    truncated = len(ids) > max_length
    return Sample(ids[:max_length], labels[:max_length]), truncated


def load_conversations(cfg: DataConfig) -> tuple[list[list[dict]], int]:
    """Every row of every file as a validated conversation; errors name file, line and field."""
    map_fn = cfg.map_fn or FORMATS[cfg.format]
    paths = [cfg.path] if isinstance(cfg.path, str) else list(cfg.path)
    conversations, rows = [], 0
    for path in paths:
        for file, line, row in iter_rows(path):
            rows += 1
            try:
                messages = check_messages(map_fn(row)["messages"])
            except RowError as e:
                raise TunerError(f"{file}:{line}: {e}") from None
            except (KeyError, TypeError) as e:  # a user's map function that trips on the row
                raise TunerError(f"{file}:{line}: map function {map_fn.__name__} failed: {e!r}") from None
            if cfg.system is not None and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": cfg.system, "loss": False})
            conversations.append(messages)
    if not conversations:
        raise TunerError(f"no rows in {', '.join(map(str, paths))}")
    return conversations, rows


def pack(samples: list[Sample], max_length: int) -> list[Sample]:
    """Best-fit decreasing: each sample goes whole into the fullest sequence it still fits.

    [len 6, len 3, len 5, len 2] at max_length 8 -> [6+2], [5+3]
    """
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(samples[i].input_ids)
        best = min((b for b in range(len(bins)) if free[b] >= n), key=lambda b: free[b], default=None)
        if best is None:
            bins.append([]), free.append(max_length)
            best = len(bins) - 1
        bins[best].append(i)
        free[best] -= n
    packed = []
    for members in bins:
        members.sort()  # keep the data's own order inside a sequence
        packed.append(Sample(
            input_ids=[t for i in members for t in samples[i].input_ids],
            labels=[t for i in members for t in samples[i].labels],
            position_ids=[p for i in members for p in samples[i].position_ids]))
    return packed


def build_sequences(cfg: DataConfig, tokenizer) -> tuple[list[Sample], DataStats]:
    """The training sequences for a data config, and what happened on the way."""
    template = get_template(cfg.template, tokenizer)
    conversations, rows = load_conversations(cfg)
    stats = DataStats(rows=rows)
    samples = []
    for messages in conversations:
        sample, truncated = encode(messages, tokenizer, template, cfg.max_length)
        stats.truncated += truncated
        if all(label == IGNORE for label in sample.labels):
            stats.dropped_no_loss += 1
            continue
        samples.append(sample)
        stats.tokens += len(sample.input_ids)
        stats.trained_tokens += sum(label != IGNORE for label in sample.labels)
    stats.samples = len(samples)
    if not samples:
        raise TunerError(f"no sample has a trainable token left after truncation to max_length={cfg.max_length}")
    sequences = pack(samples, cfg.max_length) if cfg.pack else samples
    stats.sequences = len(sequences)
    if cfg.pack:
        stats.packing_efficiency = stats.tokens / (len(sequences) * cfg.max_length)
    return sequences, stats


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

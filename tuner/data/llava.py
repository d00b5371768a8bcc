"""LLaVA-format data -> packed training sequences with their images.

    row     {"id": "1", "image": "cat.png",
             "conversations": [{"from": "human", "value": "<image>\\nWhat animal is this?"},
                               {"from": "gpt", "value": "A cat."}]}
    text    "<|im_start|>user\\n<image>\\nWhat animal is this?<|im_end|>\\n<|im_start|>assistant\\nA cat.<|im_end|>\\n"
    ids     [..., IMG, IMG, ... (one per patch: 576 for a 336px ViT-L/14), ..., 'A', ' cat', '.', ...]
    labels  IGNORE on the prompt and the image tokens; the reply is trained

"images": [...] gives several images, one per "<image>" in order. A row with images but
no "<image>" gets one in front of its first user message (LLaVA's convention); rows
without images are text-only and mix in freely.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from tuner.config import DataConfig, LlavaConfig
from tuner.data.dataset import (
    Sample,
    collate,
    length_histogram,
    pack_best_fit,
    sample_order,
)
from tuner.data.encode import IGNORE
from tuner.data.tokenized import ImageSettings, TokenStore, load_token_store
from tuner.errors import TunerError


@dataclass
class VisionInfo:
    """What the data side needs to know about the vision encoder."""
    image_token_id: int
    tokens_per_image: int
    processor: object  # the encoder's image processor (resize, crop, normalize)
    pad_to_square: bool

    def pixel_values(self, images: list) -> torch.Tensor:
        """PIL images -> (n, 3, H, W), each padded to a square with the mean colour first (LLaVA-1.5)."""
        if self.pad_to_square:
            fill = tuple(int(255 * m) for m in self.processor.image_mean)
            images = [expand_to_square(image, fill) for image in images]
        return self.processor(images=images, return_tensors="pt")["pixel_values"]


def expand_to_square(image, fill):
    from PIL import Image

    image = image.convert("RGB")
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square



_DECODERS: dict[int, ThreadPoolExecutor] = {}


def _decoders() -> ThreadPoolExecutor:
    """This process's image decoding threads (PIL decodes without the GIL). One pool per process id:
    a DataLoader worker is forked, and a pool copied by fork has no threads behind it (it would hang)."""
    pid = os.getpid()
    if pid not in _DECODERS:
        _DECODERS[pid] = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tuner-images")
    return _DECODERS[pid]


@dataclass
class ImageSample(Sample):
    images: list[str] = field(default_factory=list)
    """image files, in the order of their tokens"""


def expand_image_tokens(ids: list[int], labels: list[int], vision: VisionInfo) -> tuple[list[int], list[int]]:
    """Each image token id becomes `tokens_per_image` of them, never trained."""
    ids, labels = np.asarray(ids), np.asarray(labels)
    counts = np.where(ids == vision.image_token_id, vision.tokens_per_image, 1)
    out_labels = np.repeat(np.where(ids == vision.image_token_id, IGNORE, labels), counts)
    return np.repeat(ids, counts).tolist(), out_labels.tolist()


class ImageSequences:
    """Training sequences (packed samples) from the token store, with their images, loaded when batched."""

    def __init__(self, store: TokenStore, plan: list[list[int]], vision: VisionInfo, lengths: np.ndarray):
        self.store, self.plan, self.vision, self.lengths = store, plan, vision, lengths

    def __len__(self) -> int:
        return len(self.plan)

    def num_tokens(self, k: int) -> int:
        return int(sum(self.lengths[i] for i in self.plan[k]))

    def __getitem__(self, k: int) -> ImageSample:
        ids, labels, positions, images = [], [], [], []
        for i in self.plan[k]:
            sample_ids, trained = self.store.sample(i)
            sample_labels = np.where(trained, sample_ids, IGNORE)
            sample_labels[0] = IGNORE  # nothing predicts a sample's first token
            expanded_ids, expanded_labels = expand_image_tokens(sample_ids, sample_labels, self.vision)
            ids += expanded_ids
            labels += expanded_labels
            positions += range(len(expanded_ids))
            images += self.store.images(i)
        return ImageSample(ids, labels, positions, images)

    def collate(self, batch: list[ImageSample], pad_id: int) -> dict[str, torch.Tensor]:
        """`collate` plus pixel_values: every image of the batch, in the order of its tokens, decoded in
        worker threads."""
        from PIL import Image

        out = collate(batch, pad_id)
        paths = [p for sample in batch for p in sample.images]
        if paths:
            decoded = list(_decoders().map(lambda p: Image.open(p).convert("RGB"), paths))
            out["pixel_values"] = self.vision.pixel_values(decoded)
        return out


def expanded_lengths(store: TokenStore, tokens_per_image: int) -> np.ndarray:
    """Each sample's length once its image tokens are expanded."""
    return store.lengths + store.n_images * (tokens_per_image - 1)


def build_image_sequences(cfg: DataConfig, llava: LlavaConfig, tokenizer, vision: VisionInfo,
                          say=print, seed: int = 0) -> ImageSequences:
    """LLaVA data through the same tokenized cache as text: tokenized once (on every core), memory-mapped,
    read by every process; format, map_fn, repeats and system honoured. Each row is checked (its images
    exist, one '<image>' per image); a sample whose images would not fit in max_length is dropped."""
    if cfg.pack_split:
        raise TunerError("data.pack_split cuts samples across sequences, which would cut through images",
                         hint="set data.pack_split=False for LLaVA data")
    store, from_cache = load_token_store(cfg, tokenizer, say, images=ImageSettings(llava.image_folder,
                                                                                    vision.tokens_per_image))
    lengths = expanded_lengths(store, vision.tokens_per_image)
    order = sample_order(store.stats, [s.repeats for s in cfg.source_list()], seed)
    if cfg.pack:
        plan = [[order[j] for j in group] for group in pack_best_fit([int(lengths[i]) for i in order], cfg.max_length)]
    else:
        plan = [[i] for i in order]
    stats, with_images = store.stats, int((store.n_images > 0).sum())
    tokens = int(sum(lengths[i] for i in order))
    efficiency = tokens / (len(plan) * cfg.max_length) if cfg.pack else 1.0
    bad = f", {stats.bad_rows} bad rows skipped (first: {stats.bad_row_examples[0]})" if stats.bad_rows else ""
    say(f"Data: {stats.rows} rows -> {stats.samples} samples ({with_images} with {int(store.n_images.sum())} images, "
        f"{stats.samples - with_images} text-only), {tokens} tokens ({vision.tokens_per_image} per image), "
        f"{stats.truncated} truncated, {stats.dropped_too_long} dropped as too long{bad}; {len(plan)} sequences, "
        f"packing efficiency {efficiency:.1%}" + (" (from cache)" if from_cache else ""))
    say("sample lengths: " + "  ".join(f"<={edge}: {count}" for edge, count in length_histogram(lengths)))
    return ImageSequences(store, plan, vision, lengths)

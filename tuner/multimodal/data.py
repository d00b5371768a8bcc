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

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tuner.config import DataConfig, LlavaConfig
from tuner.data.dataset import Sample, collate, pack_best_fit
from tuner.data.encode import IGNORE, encode_conversation
from tuner.data.formats import RowError, sharegpt_map_fn
from tuner.data.sources import BAD_ROW, iter_rows
from tuner.data.templates import get_template
from tuner.errors import TunerError
from tuner.multimodal.model import IMAGE_TOKEN, VisionInfo


@dataclass
class ImageSample(Sample):
    images: list[str] = field(default_factory=list)
    """image files, in the order of their tokens"""


def llava_messages(row: dict) -> tuple[list[dict], list[str]]:
    """A LLaVA row -> (messages with '<image>' placeholders, image paths)."""
    images = row.get("images") if row.get("images") is not None else ([row["image"]] if row.get("image") else [])
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise RowError("images", "must be a list of image paths")
    messages = sharegpt_map_fn(row)["messages"]
    placeholders = sum(str(m["content"]).count(IMAGE_TOKEN) for m in messages)
    if images and placeholders == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise RowError("conversations", "has images but no human turn to put them in")
        first_user["content"] = f"{IMAGE_TOKEN}\n{first_user['content']}"
        placeholders = 1 if len(images) == 1 else 0
    if placeholders != len(images):
        raise RowError("conversations", f"{placeholders} {IMAGE_TOKEN} placeholders for {len(images)} images")
    return messages, images


def expand_image_tokens(ids: list[int], labels: list[int], vision: VisionInfo) -> tuple[list[int], list[int]]:
    """Each image token id becomes `tokens_per_image` of them, never trained."""
    out_ids, out_labels = [], []
    for token, label in zip(ids, labels):
        if token == vision.image_token_id:
            out_ids += [token] * vision.tokens_per_image
            out_labels += [IGNORE] * vision.tokens_per_image
        else:
            out_ids.append(token)
            out_labels.append(label)
    return out_ids, out_labels


class ImageSequences:
    """Training sequences (packed samples) and the images they hold, loaded when batched."""

    def __init__(self, samples: list[ImageSample], plan: list[list[int]], vision: VisionInfo):
        self.samples, self.plan, self.vision = samples, plan, vision

    def __len__(self) -> int:
        return len(self.plan)

    def num_tokens(self, k: int) -> int:
        return sum(len(self.samples[i].input_ids) for i in self.plan[k])

    def __getitem__(self, k: int) -> ImageSample:
        ids, labels, positions, images = [], [], [], []
        for i in self.plan[k]:
            sample = self.samples[i]
            ids += sample.input_ids
            labels += sample.labels
            positions += range(len(sample.input_ids))
            images += sample.images
        return ImageSample(ids, labels, positions, images)

    def collate(self, batch: list[ImageSample], pad_id: int) -> dict[str, torch.Tensor]:
        """`collate` plus pixel_values: every image of the batch, in the order of its tokens."""
        from PIL import Image

        out = collate(batch, pad_id)
        paths = [p for sample in batch for p in sample.images]
        if paths:
            out["pixel_values"] = self.vision.pixel_values([Image.open(p) for p in paths])
        return out


def build_image_sequences(cfg: DataConfig, llava: LlavaConfig, tokenizer, vision: VisionInfo,
                          say=print) -> ImageSequences:
    template = get_template(cfg.template, tokenizer)
    samples, bad, dropped, truncated = [], [], 0, 0
    for source in cfg.source_list():
        for place, line, row in iter_rows(source.path, source.split):
            where = f"{place}:{line}"
            try:
                if BAD_ROW in row:
                    raise RowError("", row[BAD_ROW])
                messages, images = llava_messages(row)
                folder = Path(llava.image_folder) if llava.image_folder else Path(place).parent
                paths = [str(folder / image) for image in images]
                missing = [p for p in paths if not Path(p).is_file()]
                if missing:
                    raise RowError("image", f"file not found: {missing[0]}")
                if cfg.system is not None and messages[0]["role"] != "system":
                    messages.insert(0, {"role": "system", "content": cfg.system})
                encoded = encode_conversation(messages, tokenizer, template, None)
            except (RowError, TunerError) as e:
                if not cfg.skip_bad_rows:
                    raise TunerError(f"{where}: {e}",
                                     hint="fix the row, or set data.skip_bad_rows=True to skip such rows") from None
                bad.append(where)
                continue
            labels = np.where(encoded.trained, encoded.ids, IGNORE).tolist()
            ids, labels = expand_image_tokens(encoded.ids.tolist(), labels, vision)
            if len(ids) > cfg.max_length:
                if images or cfg.truncation == "drop":  # cutting through an image would break it
                    dropped += 1
                    continue
                ids, labels, truncated = ids[:cfg.max_length], labels[:cfg.max_length], truncated + 1
            labels[0] = IGNORE
            samples.append(ImageSample(ids, labels, images=paths))
    if not samples:
        raise TunerError(f"no usable samples in {cfg.path}")
    lengths = [len(s.input_ids) for s in samples]
    plan = pack_best_fit(lengths, cfg.max_length) if cfg.pack else [[i] for i in range(len(samples))]
    with_images = sum(1 for s in samples if s.images)
    images = sum(len(s.images) for s in samples)
    efficiency = sum(lengths) / (len(plan) * cfg.max_length) if cfg.pack else 1.0
    say(f"Data: {len(samples)} samples ({with_images} with {images} images, {len(samples) - with_images} text-only), "
        f"{sum(lengths)} tokens ({vision.tokens_per_image} per image), {truncated} truncated, {dropped} dropped as "
        f"too long, {len(bad)} bad rows skipped; {len(plan)} sequences, packing efficiency {efficiency:.1%}")
    return ImageSequences(samples, plan, vision)

"""A reward model's score of each sample: the scalar head's output at the sample's last token.

A reward model is transformers' sequence-classification model with one label (the LLM plus a linear
`score` head). Its own forward reads the score at each row's last non-pad token, which is wrong for
packed rows; so the head's output at every position is taken by a forward hook and each sample's
score read at its own last token (`sample_ids`, as in data/pairs.py). The forward still goes through
the wrappers (DDP, FSDP2, DeepSpeed), so their hooks run as for any other step.
"""

from __future__ import annotations

import torch

from tuner.model import packed_attention
from tuner.model.device import autocast
from tuner.model.logps import PAIR_KEYS


def reward_head(model) -> torch.nn.Module:
    """The `score` module (peft's wrapper of it for LoRA) of a reward model, inside any wrapper."""
    names = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] == "score"]
    if not names:
        raise ValueError("this model has no reward head (a 'score' module)")
    return model.get_submodule(min(names, key=len))


def is_reward_model(config) -> bool:
    """Whether a model folder's config is a reward model (a sequence-classification head)."""
    return any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or [])


def sample_rewards(model, batch: dict[str, torch.Tensor], device: torch.device, compute_dtype: torch.dtype,
                   attention: str) -> torch.Tensor:
    """Each sample's reward (float32, one per sample id 0, 1, ...): the head's output at its last token."""
    seen = []
    handle = reward_head(model).register_forward_hook(lambda module, args, output: seen.append(output))
    kwargs = {k: v for k, v in batch.items() if k not in PAIR_KEYS and k != "attention_mask"}
    if attention in (packed_attention.NAME, "flash_attention_2"):  # sample starts, once for all layers
        kwargs.update(packed_attention.varlen_kwargs(batch["position_ids"]))
    try:
        with autocast(device, compute_dtype):
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **kwargs)
    finally:
        handle.remove()
    scores = seen[-1].flatten(0, 1)[:, 0].float()  # (rows * positions,)
    slots = batch["sample_ids"].flatten()
    positions = torch.arange(len(slots), device=slots.device)
    valid = slots >= 0
    last = torch.full((int(slots.max()) + 1,), -1, dtype=torch.long, device=slots.device)
    last = last.scatter_reduce(0, slots[valid], positions[valid], reduce="amax")
    return scores[last.to(scores.device)]

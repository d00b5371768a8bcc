"""Each answer's log-probability under a model, for preference pairs (data/pairs.py batches).

One forward over the batch; logits only at positions whose next token is trained (the answers),
each token's log-prob summed into its answer by `sample_ids`: chosen answers at even places,
rejected at odd ones. Used by the preference objectives (engine/preference.py) and `tuner score`.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from tuner.data.dataset import IGNORE
from tuner.model import packed_attention
from tuner.model.device import autocast

PAIR_KEYS = ("input_ids", "position_ids", "labels", "sample_ids", "pair_index", "shift_labels",
             "shift_sample_ids")  # not passed to the model


def takes_logits_to_keep(model) -> bool:
    """Whether the model (a PeftModel's base) computes logits only at the positions it is given."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def count_pairs(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["sample_ids"].max()) // 2 + 1


def answer_logps(model, batch: dict[str, torch.Tensor], device: torch.device, compute_dtype: torch.dtype,
                 attention: str, takes_logits_to_keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each answer's tokens, its number of tokens), both float32, one per sample id
    (pairs: chosen, rejected, chosen, ...). A sequence-parallel piece (engine/seqpar.py) comes with its labels
    and sample ids shifted already: its sums are of its own tokens."""
    shifted = "shift_labels" in batch
    targets, slots = ((batch["shift_labels"], batch["shift_sample_ids"]) if shifted else
                      (batch["labels"][:, 1:], batch["sample_ids"][:, 1:]))
    keep = (targets != IGNORE).any(0).nonzero().squeeze(-1)
    kwargs = {k: v for k, v in batch.items() if k not in PAIR_KEYS}
    if takes_logits_to_keep:
        kwargs["logits_to_keep"] = keep
    if attention in (packed_attention.NAME, "flash_attention_2"):  # sample starts, once for all layers
        kwargs.update(packed_attention.varlen_kwargs(batch["position_ids"]))
    with autocast(device, compute_dtype):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       **kwargs).logits
    if not takes_logits_to_keep:
        logits = (logits if shifted else logits[:, :-1])[:, keep]
    targets, slots = targets[:, keep].flatten(), slots[:, keep].flatten()
    trained = targets != IGNORE
    token_logps = -F.cross_entropy(logits.flatten(0, 1).float()[trained], targets[trained], reduction="none")
    n = int(batch["sample_ids"].max()) + 1  # (pairs: 2 per pair, the rejected answer last)
    logps = torch.zeros(n, dtype=torch.float32, device=logits.device).index_add(0, slots[trained], token_logps)
    lengths = torch.zeros(n, dtype=torch.float32, device=logits.device).index_add(
        0, slots[trained], torch.ones_like(token_logps))
    return logps, lengths

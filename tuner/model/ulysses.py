"""Sequence-parallel attention (DeepSpeed-Ulysses): each of a group's N processes holds 1/N of a
sequence's tokens; around attention, one all-to-all turns "my tokens, all heads" into "all tokens, my
heads", attention runs per sample over the whole sequence (tuner's packed attention: the samples of a
packed row never see each other, whichever shards they straddle), and another all-to-all turns the
result back. Everything else in the model (embeddings, MLPs, norms, RoPE with each token's own position)
works on the local tokens as it is.

The loop sets the group and the whole row's position ids for each forward (`active`); outside that
(generation, evaluation on one process) the attention is transformers' sdpa.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from tuner.model import packed_attention

NAME = "tuner_ulysses"


@dataclass
class _Context:
    group: object = None
    size: int = 1
    positions: torch.Tensor | None = None  # (batch, whole length): the row's position ids, all shards


CONTEXT = _Context()


@contextlib.contextmanager
def active(group, size: int, positions: torch.Tensor):
    """Within: the model's attention is sharded over `group` (size processes), for rows with these positions."""
    CONTEXT.group, CONTEXT.size, CONTEXT.positions = group, size, positions
    try:
        yield
    finally:
        CONTEXT.positions = None


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Chunk i of dim 0 goes to process i; returns what each process sent, stacked on dim 0 (autograd: the
    backward is the same exchange the other way)."""
    import torch.distributed as dist
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    # (contiguous: a strided view is sent as if it were, and its pieces would be mixed up)
    out = all_to_all_single_autograd(x.contiguous(), None, None, group if group is not None else dist.group.WORLD)
    return wait_tensor(out)


def _tokens_to_heads(x: torch.Tensor, size: int, group) -> torch.Tensor:
    """(batch, heads, local length, dim) -> (batch, heads / size, whole length, dim)."""
    b, h, s, d = x.shape
    x = x.reshape(b, size, h // size, s, d).transpose(0, 1)  # (size, b, h/size, s, d): chunk i for process i
    x = _all_to_all(x, group)  # chunk i: process i's tokens of my heads
    return x.permute(1, 2, 0, 3, 4).reshape(b, h // size, size * s, d)


def _heads_to_tokens(x: torch.Tensor, size: int, group) -> torch.Tensor:
    """(batch, whole length, heads / size, dim) -> (batch, local length, heads, dim)."""
    b, total, h, d = x.shape
    x = x.reshape(b, size, total // size, h, d).transpose(0, 1)  # chunk i: process i's tokens
    x = _all_to_all(x, group)  # chunk i: my tokens of process i's heads
    return x.permute(1, 2, 0, 3, 4).reshape(b, total // size, size * h, d)


def ulysses_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                              **kwargs):
    """query (B, H, s, D), key/value (B, Hkv, s, D) of this process's s tokens -> (B, s, H, D)."""
    size, group, positions = CONTEXT.size, CONTEXT.group, CONTEXT.positions
    if positions is None or attention_mask is not None or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads % size:  # fewer key/value heads than processes (or not divisible): repeat them to the query heads
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    query, key, value = (_tokens_to_heads(t, size, group) for t in (query, key, value))
    varlen = packed_attention.varlen_kwargs(positions)
    out, _ = packed_attention.packed_attention_forward(module, query, key, value, None, dropout=dropout,
                                                       scaling=scaling, position_ids=positions, **varlen)
    return _heads_to_tokens(out, size, group), None


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, ulysses_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, packed_attention.packed_mask)
    return NAME


def check_heads(model, size: int) -> None:
    """Refuse a sequence-parallel size the model's query heads do not divide, naming what works."""
    from tuner.errors import TunerError

    config = getattr(model.config, "text_config", None) or model.config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads is None or heads % size:
        works = [n for n in range(2, (heads or 0) + 1) if heads % n == 0]
        raise TunerError(f"train.sequence_parallel_size={size}: the model has {heads} query heads and {kv_heads} "
                         f"key/value heads; each process takes heads / {size} of them",
                         hint=f"sizes that divide its heads: {', '.join(map(str, works)) or 'none'}")

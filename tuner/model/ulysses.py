"""Sequence-parallel attention (DeepSpeed-Ulysses): each of a group's N processes holds 1/N of a
sequence's tokens; around attention, one all-to-all turns "my tokens, all heads" into "all tokens, my
heads", attention runs per sample over the whole sequence (tuner's packed attention: the samples of a
packed row never see each other, whichever shards they straddle), and another all-to-all turns the
result back. Everything else in the model (embeddings, MLPs, norms, RoPE with each token's own position)
works on the local tokens as it is.

The loop sets the group and the whole row's position ids for each forward (`active`); outside that
(generation, evaluation on one process) the attention is transformers' sdpa. Between the exchanges the
attention over the whole sequence is the one the run would use without sharding: FlashAttention's varlen
kernel where the run chose flash_attention_2 (a GPU with flash-attn), tuner's per-sample SDPA otherwise.
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
    inner: str = packed_attention.NAME  # the attention over the whole sequence, on this process's heads


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
    if CONTEXT.inner == "flash_attention_2":  # (varlen, from the sample starts: as the run without sharding)
        from transformers.integrations.flash_attention import flash_attention_forward as attend
    else:
        attend = packed_attention.packed_attention_forward
    out, _ = attend(module, query, key, value, None, dropout=dropout, scaling=scaling, position_ids=positions, **varlen)
    return _heads_to_tokens(out, size, group), None


def register(inner: str = packed_attention.NAME) -> str:
    """Make NAME a transformers attention implementation; `inner`: the attention the run would use unsharded
    (flash_attention_2 is kept inside the exchange; anything else becomes tuner's per-sample SDPA, which
    computes the same)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    CONTEXT.inner = "flash_attention_2" if inner == "flash_attention_2" else packed_attention.NAME
    AttentionInterface.register(NAME, ulysses_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, packed_attention.packed_mask)
    return NAME


def check_model(model, size: int) -> None:
    """Refuse a model whose attention cannot be sharded this way: its own code (remote code, which does not
    call transformers' attention functions), sliding windows or soft-capped scores (the per-sample attention
    inside the exchange has neither), or query heads that `size` does not divide (naming the sizes that do)."""
    from tuner.errors import TunerError

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    if not (type(base).__module__.startswith("transformers.") and type(base)._supports_attention_backend):
        raise TunerError(f"train.sequence_parallel_size={size}: {name} runs its own code (remote code), whose "
                         "attention cannot be sharded over processes", hint="set train.sequence_parallel_size=1, "
                         "or use a model transformers supports natively")
    config = getattr(model.config, "text_config", None) or model.config
    window = getattr(config, "use_sliding_window", True) and getattr(config, "sliding_window", None)
    if window or getattr(config, "attn_logit_softcapping", None):
        what = f"a sliding window of {window} tokens" if window else "soft-capped attention scores"
        raise TunerError(f"train.sequence_parallel_size={size}: {name} has {what}, which the sharded attention "
                         "does not compute", hint="set train.sequence_parallel_size=1")
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads is None or heads % size:
        works = [n for n in range(2, (heads or 0) + 1) if heads % n == 0]
        raise TunerError(f"train.sequence_parallel_size={size}: the model has {heads} query heads and {kv_heads} "
                         f"key/value heads; each process takes heads / {size} of them",
                         hint=f"sizes that divide its heads: {', '.join(map(str, works)) or 'none'}")

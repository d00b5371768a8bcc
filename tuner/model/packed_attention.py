"""Attention for packed sequences that computes only within each sample.

A packed row holds several samples one after another; position ids restart at 0 where a
sample starts. transformers' "sdpa" keeps them apart with a full (seq x seq) mask: it
computes every cross-sample score only to mask it out, builds the mask, and on a CPU the
masked kernel keeps more for backward. Here each sample (a run of consecutive position
ids) gets its own causal SDPA call, as FlashAttention's varlen kernel does on a GPU:
attention work falls from seq^2 to the sum of the samples' squared lengths, and no mask
exists. The result is the same as the masked computation (tested against "sdpa").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "tuner_packed"


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per batch row, the (start, end) of each run of consecutive position ids."""
    rows = []
    for row in position_ids.tolist():
        starts = [0] + [i for i in range(1, len(row)) if row[i] != row[i - 1] + 1]
        rows.append(list(zip(starts, starts[1:] + [len(row)])))
    return rows


def packed_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             is_causal=None, **kwargs):
    """Drop-in for transformers' attention functions: query (B, H, S, D), key/value (B, Hkv, S, D);
    returns (B, S, H, D) and no weights. Anything but a training-style call (a mask, a KV
    cache, no position ids) goes to transformers' own sdpa."""
    position_ids = kwargs.get("position_ids")
    if (attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]
            or query.shape[2] == 1 or not getattr(module, "is_causal", True)):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, row in enumerate(segments(position_ids.expand(query.shape[0], -1))):
        q, k, v = query[b:b + 1], key[b:b + 1], value[b:b + 1]
        rows.append(torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], dropout_p=dropout,
                                                              scale=scaling, is_causal=True, enable_gqa=gqa)
                               for s, e in row], dim=2))
    out = torch.cat(rows).transpose(1, 2).contiguous()
    return out, None


def packed_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """No mask where the position ids say it all (training, a fresh prompt without padding);
    sdpa's mask otherwise (padded batches, decoding), which the attention hands to sdpa."""
    if attention_mask is None and q_offset == 0 and kv_offset == 0 and q_length == kv_length:
        return None
    from transformers.masking_utils import sdpa_mask
    return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Make NAME a transformers attention implementation, with its mask function."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, packed_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, packed_mask)
    return NAME


def choose(requested: str, device: torch.device) -> str:
    """The attention a training run uses: 'auto' -> FlashAttention 2 (varlen from the position
    ids) on a GPU where flash-attn is installed, else NAME; a named one is kept."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        import importlib.util
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return NAME


def use_for_training(model, requested: str, device: torch.device) -> str:
    """Switch a loaded model (loaded with sdpa) to the training attention; models whose code does
    not go through transformers' AttentionInterface (remote code) keep sdpa. Returns the one used."""
    chosen = choose(requested, device)
    config = getattr(model.config, "text_config", None) or model.config
    if chosen == NAME and (getattr(config, "use_sliding_window", True) and getattr(config, "sliding_window", None)
                           or getattr(config, "attn_logit_softcapping", None)):
        chosen = "sdpa"  # windows and soft-capping are not done per sample here: keep transformers' own
    if chosen == NAME:
        register()
    if chosen == model.config._attn_implementation or not model._can_set_attn_implementation():
        return model.config._attn_implementation
    model.set_attn_implementation(chosen)
    return chosen

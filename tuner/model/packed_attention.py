"""Attention for packed sequences that computes only within each sample.

A packed row holds several samples one after another; position ids restart at 0 where a
sample starts. transformers' "sdpa" keeps them apart with a full (seq x seq) mask: it
computes every cross-sample score only to mask it out, builds the mask, and on a CPU the
masked kernel keeps more for backward. Here each sample (a run of consecutive position
ids) gets its own causal SDPA call, as FlashAttention's varlen kernel does on a GPU:
attention work falls from seq^2 to the sum of the samples' squared lengths, and no mask
exists. The result is the same as the masked computation (tested against "sdpa").

On a CPU, a sample of up to MATMUL_LONGEST tokens goes through plain matmuls and a softmax
instead of PyTorch's CPU flash kernel, whose per-call cost dominates at the lengths packed
rows hold: forward + backward of one layer over 1024 tokens (9 query / 3 key-value heads of 64,
bf16, AVX-512 bf16 CPU, 2 threads) took 15.5 / 17.6 / 16.7 / 17.3 / 29.0 ms with the flash
kernel for samples of 64 / 128 / 200 / 384 / 512 tokens and 9.0 / 8.6 / 10.1 / 11.2 / 18.9 ms
this way; at 768 and 1024 the flash kernel was faster (20.8 vs 23.7, 35.7 vs 40.8 ms), so
longer samples keep it. Like the flash kernel, it keeps only q, k and v for backward and
computes the probabilities again there: saving them would cost heads x length^2 values per
sample and layer.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

NAME = "tuner_packed"
MATMUL_LONGEST = 512
"""On a CPU, samples up to this many tokens take the matmul attention (measured above)"""


def varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """Where the samples of a packed batch start, in FlashAttention's varlen form: the rows laid end
    to end, `cu_seq_lens` the start of every run of consecutive position ids plus the total length.

    The loop computes this once per batch and hands it to the model, which passes it to every
    layer's attention (tuner_packed and flash_attention_2 both read it): transformers would
    otherwise infer it again in every layer, and for flash_attention_2 only when the batch has a
    single row (with two or more rows, samples of a row would attend to each other)."""
    flat = position_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1] + 1
    starts[::position_ids.shape[-1]] = True  # every row starts a sample
    cu = torch.cat([starts.nonzero().view(-1), flat.new_tensor([flat.numel()])]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


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
    batch, heads, length, dim = query.shape
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or int(cu[-1]) != batch * length:  # not handed in by the loop: from the position ids
        cu = varlen_kwargs(position_ids.expand(batch, -1))["cu_seq_lens_q"]
    bounds = cu.tolist()
    # unbind + split, not a slice per sample: a slice's backward writes its gradient into a zero
    # tensor of the whole input, so n samples cost n whole-size tensors per layer (quadratic in
    # the packed length); split's backward is one concatenation.
    per_row = [[] for _ in range(batch)]  # each row's sample lengths: samples never cross rows
    for start, end in zip(bounds, bounds[1:]):
        per_row[start // length].append(end - start)
    gqa = heads != key.shape[1]
    matmuls = query.device.type == "cpu" and (dropout == 0 or not module.training)  # (GPUs keep their kernels)
    scale = scaling if scaling is not None else dim ** -0.5
    # What sdpa would compute in under autocast (rotary embedding can leave q and k in float32, v in bf16)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else value.dtype
    # (Each sample is cast alone: casting the whole q, k, v first and saving views of them made a
    # jemalloc run's memory grow by 0.15 GiB a step, 1.49 -> 2.57 GiB over 8 steps, for no speed.)
    pieces = []
    for q_row, k_row, v_row, row_lengths in zip(query.unbind(0), key.unbind(0), value.unbind(0), per_row):
        for q, k, v in zip(q_row.split(row_lengths, dim=1), k_row.split(row_lengths, dim=1),
                           v_row.split(row_lengths, dim=1)):
            if matmuls and q.shape[1] <= MATMUL_LONGEST:
                pieces.append(_MatmulAttention.apply(q.to(dtype), k.to(dtype), v.to(dtype), scale))
            else:
                pieces.append(F.scaled_dot_product_attention(q[None], k[None], v[None], dropout_p=dropout,
                                                             scale=scaling, is_causal=True, enable_gqa=gqa)[0])
    out = torch.cat(pieces, dim=1).transpose(0, 1).reshape(batch, length, heads, dim)
    return out, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sample's causal attention in matmuls: q (H, L, D), k / v (Hkv, L, D) -> (H, L, D). The query
    heads that share a key/value head are laid end to end, so grouped-query attention needs no copy
    of k and v. Scores are in the inputs' dtype and the softmax accumulates in float32, as
    transformers' eager attention does."""
    heads, length, dim = q.shape
    return (_probabilities(_grouped(q, k), k, scale) @ v).view(heads, length, dim)


def _grouped(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (H, L, D) as (Hkv, H / Hkv x L, D): the query heads of each key head end to end (a copy only
    where q is a strided view, as a sample cut from a bf16 row is)."""
    return q.reshape(k.shape[0], -1, q.shape[-1])


def _probabilities(grouped_q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale q k^T + causal mask), (Hkv, H / Hkv x L, L), for q as _grouped lays it out."""
    length = k.shape[1]
    group = grouped_q.shape[1] // length
    # scale * q k^T + mask in one call
    scores = torch.baddbmm(causal_mask(length, group, grouped_q.dtype, grouped_q.device), grouped_q,
                           k.transpose(1, 2), alpha=scale)
    return torch.softmax(scores, dim=-1)


@functools.lru_cache(maxsize=32)
def causal_mask(length: int, group: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """0 on and below the diagonal, -inf above, (length x length) laid `group` times end to end: the
    additive mask of `group` query heads' scores against one key head. Kept for the next calls (every
    layer, forward and backward, meets the same sample lengths) and only read: baddbmm's input."""
    future = torch.ones(length, length, dtype=torch.bool, device=device).triu_(1)
    return torch.zeros(length, length, dtype=dtype, device=device).masked_fill_(future, float("-inf")).repeat(group, 1)


class _MatmulAttention(torch.autograd.Function):
    """causal_attention, keeping q, k, v for backward and computing the probabilities again there.

    Backward is written out: what autograd computes through causal_attention, in its order (the same
    bits; dK as (Q^T dS)^T, not dS^T Q, which differs in the last bit at 512 tokens), without the graph
    of the recomputation and its two passes scaling the gradients:
        P = softmax(S), S = s Q K^T + mask:  dV = P^T dO;  dS = P (dP - rowsum(P dP)), dP = dO V^T;
        dQ = s dS K;  dK = s (Q^T dS)^T
    One sample of 205 tokens (SmolLM2's 9 / 3 heads, bf16), forward + backward: 1.65 -> 1.44 ms."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        with torch.no_grad(), torch.autocast("cpu", enabled=False):  # (backward runs without autocast)
            return causal_attention(q, k, v, scale)

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        heads, length, dim = q.shape
        scale = ctx.scale
        with torch.autocast("cpu", enabled=False):
            q = _grouped(q, k)  # (once, for the probabilities and dK)
            probs = _probabilities(q, k, scale)
            grad = _grouped(grad, k)
            grad_v = torch.bmm(probs.transpose(1, 2), grad)
            grad_scores = torch._softmax_backward_data(torch.bmm(grad, v.transpose(1, 2)), probs, -1, probs.dtype)
            del probs
            grad_q = torch.bmm(grad_scores, k).mul_(scale).view(heads, length, dim)
            grad_k = torch.bmm(q.transpose(1, 2), grad_scores).mul_(scale).transpose(1, 2)
        return grad_q, grad_k, grad_v, None


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
    """Switch a loaded model (loaded with transformers' default attention) to the training attention;
    models whose code does not go through transformers' AttentionInterface (remote code) keep theirs.
    Returns the one used."""
    chosen = choose(requested, device)
    config = getattr(model.config, "text_config", None) or model.config
    if chosen == NAME and (getattr(config, "use_sliding_window", True) and getattr(config, "sliding_window", None)
                           or getattr(config, "attn_logit_softcapping", None)):
        chosen = model.config._attn_implementation  # windows and soft-capping are not done per sample here:
        # keep what transformers chose for the family (sdpa, or eager where sdpa cannot soft-cap: Gemma 2)
    if chosen == NAME:
        register()
    if chosen == model.config._attn_implementation or not model._can_set_attn_implementation():
        return model.config._attn_implementation
    model.set_attn_implementation(chosen)
    return chosen


def check_packing(model, attention: str) -> None:
    """Refuse packed rows when the model's attention would let their samples see each other.

    transformers' own models keep the samples of a packed row apart by their restarting position
    ids, whatever the attention (tuner_packed and flash_attention_2 compute per sample; sdpa and
    eager get a block-diagonal mask). A model whose code is not transformers' (remote code) builds
    its own causal mask and ignores the position ids."""
    from tuner.errors import TunerError

    native = type(model).__module__.startswith("transformers.") and type(model)._supports_attention_backend
    if not native:
        raise TunerError(
            f"data.pack=True, but {type(model).__name__} runs its own code (remote code) and its attention does "
            "not keep the packed samples apart: each sample would see the ones before it",
            hint="set data.pack=False (pack_to_max_length = False in a config), or use a model transformers "
                 "supports natively")
    if attention not in (NAME, "flash_attention_2", "sdpa", "eager", "flex_attention"):
        raise TunerError(f"data.pack=True with attention {attention!r}, which tuner has not checked keeps the packed "
                         "samples apart", hint="set model.attn_implementation='auto' or data.pack=False")

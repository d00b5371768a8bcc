"""Per-sample attention for packed rows equals transformers' masked sdpa: outputs and gradients."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tuner.model import packed_attention
from tuner.model.packed_attention import NAME, causal_attention, register, varlen_kwargs


def test_samples_are_runs_of_consecutive_positions_and_rows_start_one():
    """The rows end to end: the second row starts a sample though its first id follows the row
    before it (8 -> 9 would otherwise continue the last run)."""
    positions = torch.tensor([[0, 1, 2, 0, 1, 6, 7, 8], [9, 10, 11, 0, 1, 2, 3, 4]])
    kwargs = varlen_kwargs(positions)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 8, 11, 16]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32  # what FlashAttention's varlen kernel takes
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 5


@pytest.mark.parametrize("matmul_longest", [0, 5, 512], ids=["flash kernel", "both", "matmuls"])
def test_packed_attention_equals_masked_sdpa(tiny_model_dir, monkeypatch, matmul_longest):
    """Two rows of three and two samples (grouped-query heads: 4 query, 2 key/value): logits and
    every gradient equal the masked sdpa computation to float32 rounding, whether the samples go
    through PyTorch's flash kernel, the matmul attention (CPU, up to MATMUL_LONGEST tokens) or some each."""
    monkeypatch.setattr(packed_attention, "MATMUL_LONGEST", matmul_longest)
    register()
    torch.manual_seed(0)
    positions = torch.tensor([list(range(7)) + list(range(5)) + list(range(4)), list(range(10)) + list(range(6))])
    ids = torch.randint(0, 1000, positions.shape)
    results = []
    # the sample starts inferred from the position ids in each layer, and handed in once as the loop does
    for implementation, kwargs in (("sdpa", {}), (NAME, {}), (NAME, varlen_kwargs(positions))):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=implementation)
        logits = model(input_ids=ids, position_ids=positions, use_cache=False, **kwargs).logits
        logits.square().mean().backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    (plain, plain_grads), *packed_results = results
    for packed, packed_grads in packed_results:
        assert torch.allclose(packed, plain, atol=1e-5)
        for name, grad in plain_grads.items():
            assert torch.allclose(packed_grads[name], grad, atol=1e-6), name
    # the handed-in starts are the ones used: one sample per row attends across the packed samples
    whole_rows = varlen_kwargs(torch.arange(positions.shape[1]).expand(2, -1))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=NAME)
    logits = model(input_ids=ids, position_ids=positions, use_cache=False, **whole_rows).logits
    assert not torch.allclose(logits, plain, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_attention_equals_the_flash_kernel(dtype):
    """One sample, 6 query heads over 2 key/value heads: output and the gradients of q, k, v equal
    PyTorch's causal sdpa (float32 to rounding; bfloat16 within its precision, as eager attention)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(heads, 37, 16, dtype=dtype, requires_grad=True) for heads in (6, 2, 2))
    grad = torch.randn(6, 37, 16, dtype=dtype)
    results = []
    for attend in (lambda: packed_attention._MatmulAttention.apply(q, k, v, 0.25),
                   lambda: F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=0.25,
                                                          enable_gqa=True)[0]):
        out = attend()
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    for mine, theirs in zip(*results):
        assert mine.dtype == dtype
        assert torch.allclose(mine.float(), theirs.float(), atol=tolerance, rtol=tolerance)
    with torch.no_grad():  # causal: changing the last position's key and value changes nothing before it
        k2, v2 = k.clone(), v.clone()
        k2[:, -1] += 1
        v2[:, -1] += 1
        assert torch.equal(causal_attention(q, k, v, 0.25)[:, :-1], causal_attention(q, k2, v2, 0.25)[:, :-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(9, 3), (4, 4)], ids=["grouped", "one key head each"])
def test_matmul_attentions_written_out_backward_gives_autograds_bits(dtype, heads):
    """The backward written out computes what autograd computes through causal_attention, bit for bit:
    samples cut from a packed row (strided views, as the attention hands them in) of 1 to 512 tokens,
    and a strided gradient (the concatenation's backward hands out slices)."""
    torch.manual_seed(0)
    lengths = [1, 7, 64, 205, 300, 512]
    q_row, k_row, v_row = (torch.randn(n, sum(lengths), 16, dtype=dtype, requires_grad=True)
                           for n in (heads[0], heads[1], heads[1]))
    grad_row = torch.randn(heads[0], sum(lengths) + 3, 16, dtype=dtype)[:, 3:]
    for q, k, v, grad in zip(*(t.split(lengths, dim=1) for t in (q_row, k_row, v_row, grad_row))):
        assert not (q.is_contiguous() or grad.is_contiguous())
        written = torch.autograd.grad(packed_attention._MatmulAttention.apply(q, k, v, 0.125), (q, k, v), grad)
        by_autograd = torch.autograd.grad(causal_attention(q, k, v, 0.125), (q, k, v), grad)
        for mine, theirs in zip(written, by_autograd):
            assert mine.dtype == dtype and torch.equal(mine, theirs)


def test_the_kept_causal_masks_are_keyed_by_length_heads_dtype_and_device():
    """Each layer meets the same sample lengths, so the mask is built once and kept; every part of
    its key changes what it holds, and the one kept is what a fresh build gives."""
    packed_attention.causal_mask.cache_clear()
    mask = packed_attention.causal_mask(3, 2, torch.bfloat16, torch.device("cpu"))
    inf = float("-inf")
    expected = torch.tensor([[0, inf, inf], [0, 0, inf], [0, 0, 0]] * 2, dtype=torch.bfloat16)
    assert torch.equal(mask, expected)
    assert packed_attention.causal_mask(3, 2, torch.bfloat16, torch.device("cpu")) is mask
    others = [packed_attention.causal_mask(*key, torch.device("cpu")) for key in
              ((4, 2, torch.bfloat16), (3, 1, torch.bfloat16), (3, 2, torch.float32))]
    assert [tuple(m.shape) + (m.dtype,) for m in others] == [(8, 4, torch.bfloat16), (3, 3, torch.bfloat16),
                                                              (6, 3, torch.float32)]


def test_generation_falls_back_to_sdpa(tiny_model_dir):
    """With a KV cache (chat), the same tokens come out as with sdpa."""
    register()
    prompt = torch.tensor([[5, 9, 100, 7]])
    outputs = [AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=name).generate(
        prompt, max_new_tokens=6, do_sample=False) for name in ("sdpa", NAME)]
    assert torch.equal(outputs[0], outputs[1])


def test_padded_batch_generation_equals_sdpa(tiny_model_dir, tokenizer):
    """Left-padded batched generation (the evaluate hook and the server do it) takes sdpa's mask."""
    register()
    tokenizer.padding_side = "left"
    batch = tokenizer(["Hello there, how are you?", "Hi"], return_tensors="pt", padding=True)
    outputs = [AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=name).generate(
        **batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id) for name in ("sdpa", NAME)]
    assert torch.equal(outputs[0], outputs[1])


def test_training_with_packed_attention_follows_the_sdpa_curve(tmp_path, tiny_model_dir, data_file):
    """fp32: per-sample attention and the masked one differ only in rounding (~1e-6 per step);
    a step moves the loss by several percent, so 1e-4 catches any real difference."""
    from test_train import make_trainer

    curves = []
    for attention in ("auto", "sdpa"):
        trainer = make_trainer(tmp_path, tiny_model_dir, data_file, work=attention, epochs=2, lr=1e-2,
                               options=[f"model.attn_implementation={attention}", "train.dtype=fp32"])
        curves.append(trainer.train())
        assert trainer.attention == (NAME if attention == "auto" else "sdpa")
    assert torch.allclose(torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=1e-4), curves


def test_sliding_window_models_keep_sdpa(tmp_path):
    """A Mistral-style sliding window is not done per sample: such models keep sdpa."""
    from transformers import MistralConfig, MistralForCausalLM

    from tuner.model.packed_attention import use_for_training

    model = MistralForCausalLM(MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=8))
    assert use_for_training(model, "auto", torch.device("cpu")) == "sdpa"
    model.config.sliding_window = None
    assert use_for_training(model, "auto", torch.device("cpu")) == NAME

"""The chunked head + cross-entropy equals the plain path: values, gradients, training curves."""

import pytest
import torch
import torch.nn.functional as F

from tuner.engine.fused_loss import IGNORE, chunked_linear_cross_entropy

from test_train import make_trainer


@pytest.mark.parametrize("weight_trains", [True, False])
def test_chunked_loss_and_gradients_equal_the_plain_ones(weight_trains):
    torch.manual_seed(0)
    hidden = torch.randn(2, 37, 16, requires_grad=True)
    weight = torch.randn(101, 16, requires_grad=weight_trains)
    targets = torch.randint(0, 101, (2, 37))
    targets[0, :5] = IGNORE  # ignored rows carry neither loss nor gradient
    plain = F.cross_entropy((hidden @ weight.t()).flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                            reduction="sum")
    grads = torch.autograd.grad(plain * 0.5, [hidden] + ([weight] if weight_trains else []))
    chunked = chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=10)  # 8 chunks, the last short
    ours = torch.autograd.grad(chunked * 0.5, [hidden] + ([weight] if weight_trains else []))
    assert torch.allclose(chunked, plain, rtol=1e-6)
    for a, b in zip(ours, grads):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_training_with_the_chunked_loss_follows_the_plain_curve(tmp_path, tiny_model_dir, data_file, lora):
    """fp32: the two paths differ only in summation order, ~1e-6 relative per step; one step
    moves the loss by several percent, so 1e-4 would catch any real difference."""
    curves = []
    for chunked in (True, False):
        trainer = make_trainer(tmp_path, tiny_model_dir, data_file, work=f"work_{chunked}", lora=lora, epochs=2,
                               lr=1e-2 if lora else 2e-3, options=[f"train.chunked_loss={chunked}"])
        curves.append(trainer.train())
        assert (trainer.fused_head is not None) == chunked
    assert torch.allclose(torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=1e-4), curves


def _reference_bf16(hidden, weight, targets, chunk):
    """The chunk loop as written before the CPU buffers (still the GPU's): out-of-place logits, float32
    copy and log-softmax per chunk."""
    w, total, grads = weight.to(torch.bfloat16), torch.zeros(()), []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk].to(torch.bfloat16), targets[start:start + chunk]
        log_probs = torch.log_softmax((h @ w.t()).float(), dim=-1)
        total += F.nll_loss(log_probs, t, ignore_index=IGNORE, reduction="sum")
        grad = log_probs.exp_()
        grad[t != IGNORE, t[t != IGNORE]] -= 1.0
        grad[t == IGNORE] = 0.0
        grads.append((grad.to(torch.bfloat16) @ w).float())
    return total, torch.cat(grads)


def test_bf16_chunks_in_reused_buffers_give_the_same_bits_as_fresh_tensors():
    torch.manual_seed(0)
    hidden = torch.randn(70, 32, requires_grad=True)
    weight = torch.randn(503, 32) * 0.1
    targets = torch.randint(0, 503, (70,))
    targets[3:9] = IGNORE
    loss = chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=16, compute_dtype=torch.bfloat16)
    loss.backward()
    total, grad = _reference_bf16(hidden.detach(), weight, targets, 16)
    assert torch.equal(loss.detach(), total)
    assert torch.equal(hidden.grad, grad)


def test_a_cpu_call_allocates_its_vocabulary_wide_buffers_once_not_per_chunk():
    """8 chunks: the logits in bf16 and in float32 are two allocations of chunk x vocabulary for the whole
    call (before: four per chunk, which glibc scattered over its heap)."""
    hidden = torch.randn(8 * 64, 32, requires_grad=True)
    weight = torch.randn(4000, 32)
    targets = torch.randint(0, 4000, (8 * 64,))
    chunk_bytes = 64 * 4000 * 2  # the smallest of them: a chunk's logits in bf16
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=64, compute_dtype=torch.bfloat16)
    sizes = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage >= chunk_bytes]
    assert len(sizes) == 2, sizes

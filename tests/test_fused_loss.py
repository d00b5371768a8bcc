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

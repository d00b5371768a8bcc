"""A LoRA linear layer as one autograd function equals peft's modules: outputs, gradients, curves."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tuner.model import fast_lora

from test_train import make_trainer


class Two(torch.nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.up = torch.nn.Linear(24, 40, bias=bias)
        self.down = torch.nn.Linear(40, 24, bias=bias)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def peft_pair(bias, dropout, compute_dtype=None):
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = get_peft_model(Two(bias), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                     target_modules=["up", "down"], init_lora_weights=False))
        models.append(model)
    assert fast_lora.enable(models[1], compute_dtype) == (2, 0)  # two layers, no SwiGLU MLP
    return models


def assert_same_outputs_and_gradients(plain, fused, x, adapters: int):
    results = []
    for model in (plain, fused):
        torch.manual_seed(1)  # the same dropout masks
        inputs = x.clone().requires_grad_()
        out = model(inputs)
        out.square().sum().backward()
        results.append((out, inputs.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (out_a, gx_a, grads_a), (out_b, gx_b, grads_b) = results
    assert torch.allclose(out_a, out_b, atol=1e-5)
    assert torch.allclose(gx_a, gx_b, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * adapters  # A and B of each
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-4), name


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_outputs_and_gradients_equal_peft(bias, dropout):
    plain, fused = peft_pair(bias, dropout)
    assert_same_outputs_and_gradients(plain, fused, torch.randn(3, 5, 24), adapters=2)


def assert_bf16_autocast_matches(plain, fused, x, layers):
    """Outputs and the A gradients of `layers` under bf16 autocast equal peft's to bf16 rounding."""
    results = []
    for model in (plain, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        modules = dict(model.named_modules())
        results.append([out.float()] + [modules[f"base_model.model.{n}"].lora_A["default"].weight.grad for n in layers])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=5e-2, atol=5e-2)


def test_bf16_autocast_matches_peft_to_bf16_rounding():
    """The frozen weights are stored in bf16 (autocast would cast them to it at each call)."""
    plain, fused = peft_pair(True, 0.0, torch.bfloat16)
    assert fused.base_model.model.up.base_layer.weight.dtype == torch.bfloat16
    assert fused.base_model.model.up.lora_A["default"].weight.dtype == torch.float32
    assert_bf16_autocast_matches(plain, fused, torch.randn(4, 24), ["up"])


def test_merged_or_disabled_adapters_take_peft_path():
    plain, fused = peft_pair(True, 0.0)
    x = torch.randn(2, 24)
    with fused.disable_adapter(), plain.disable_adapter():
        assert torch.allclose(fused(x), plain(x))
    fused.merge_adapter()
    assert torch.allclose(fused(x), plain(x), atol=1e-5)


@pytest.mark.parametrize("what", ["lora_bias", "base bias trained"])
def test_layers_with_more_to_train_than_a_and_b_take_peft_path(what):
    """The function makes gradients for A and B only: a bias on B (peft's lora_bias) or a base bias that
    trains goes through peft's forward, so they get theirs."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = get_peft_model(Two(True), LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"],
                                                     init_lora_weights=False, lora_bias=what == "lora_bias"))
        if what != "lora_bias":
            model.base_model.model.up.base_layer.bias.requires_grad_()
        models.append(model)
    fast_lora.enable(models[1])
    x = torch.randn(3, 24)
    results = []
    for model in models:
        model(x).square().sum().backward()
        results.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert results[0].keys() == results[1].keys()
    for name, grad in results[0].items():
        assert results[1][name] is not None and torch.allclose(results[1][name], grad, atol=1e-5), name


def test_training_with_fused_lora_follows_peft_curve(tmp_path, tiny_model_dir, data_file):
    """fp32, dropout 0.1 (the same masks: the same RNG calls in the same order): the two paths
    differ in summation order only; 1e-4 catches any real difference."""
    curves = []
    for fused in (True, False):
        trainer = make_trainer(tmp_path, tiny_model_dir, data_file, work=f"w{fused}", epochs=2, lr=1e-2,
                               dropout=0.1, options=[f"train.fused_lora={fused}", "train.dtype=fp32"])
        curves.append(trainer.train())
        assert trainer.fused_lora == ((14, 2) if fused else (0, 0))  # 7 LoRA layers and the MLP, 2 blocks
    assert torch.allclose(torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=1e-4), curves


def swiglu_pair(dropout, bias=False):
    """A Llama MLP with LoRA on its three projections, as peft runs it and as tuner does."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = LlamaMLP(LlamaConfig(hidden_size=24, intermediate_size=56, num_attention_heads=4, mlp_bias=bias))

        def forward(self, x):
            return self.mlp(x)

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(get_peft_model(Block(), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                                                         target_modules=["gate_proj", "up_proj", "down_proj"])))
    assert fast_lora.enable(models[1]) == (3, 1)
    return models


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_swiglu_mlp_equals_peft(dropout, bias):
    """SiLU, product and LoRA down projection in one function: the same outputs and gradients
    as peft's modules, dropout included (the same mask from the same RNG draw)."""
    plain, fused = swiglu_pair(dropout, bias)
    assert_same_outputs_and_gradients(plain, fused, torch.randn(3, 7, 24), adapters=3)


def test_swiglu_mlp_under_bf16_autocast_matches_peft_to_bf16_rounding():
    plain, fused = swiglu_pair(0.0)
    assert_bf16_autocast_matches(plain, fused, torch.randn(4, 24), ["mlp.down_proj", "mlp.gate_proj"])


def test_swiglu_mlp_in_bf16_gives_autograds_bits():
    """bf16 without dropout: the gradients of gate, up, A and B equal autograd's, bit for bit, through
    down(silu(gate) * up) with the down projection as _LoraLinear: backward recomputes the product as
    forward made it, and takes SiLU's derivative from PyTorch's kernel, as autograd does."""
    torch.manual_seed(0)
    bf16 = torch.bfloat16
    gate, up = (torch.randn(37, 56, dtype=bf16, requires_grad=True) for _ in range(2))
    weight, bias = torch.randn(24, 56, dtype=bf16), torch.randn(24)
    lora_a, lora_b = torch.randn(4, 56, requires_grad=True), torch.randn(24, 4, requires_grad=True)
    grad = torch.randn(37, 24, dtype=bf16)
    results = []
    for fused in (True, False):
        if fused:
            out = fast_lora._SwiGLULoraDown.apply(gate, up, weight, bias, lora_a, lora_b, 2.0, 0.0, bf16)
        else:
            h = torch.nn.functional.silu(gate) * up
            out = fast_lora._LoraLinear.apply(h, h, weight, bias, lora_a, lora_b, 2.0, bf16)
        results.append((out, *torch.autograd.grad(out, (gate, up, lora_a, lora_b), grad)))
    for mine, autograds in zip(*results):
        assert torch.equal(mine, autograds)


def test_swiglu_mlp_saves_two_tensors_fewer_per_token():
    """What autograd keeps for backward, counted through saved-tensor hooks: peft's path keeps
    silu(gate) and the product besides gate and up (and x, shared by gate and up)."""
    plain, fused = swiglu_pair(0.0)
    x = torch.randn(2, 5, 24, requires_grad=True)
    kept = []
    for model in (plain, fused):
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}

        def pack(t):
            if t is not None and t.untyped_storage().data_ptr() not in weights:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        kept.append(sum(n for n in storages.values() if n >= 10 * 56 * 4))  # the MLP-wide (10 x 56) activations
    assert kept[0] == 4 * 10 * 56 * 4 and kept[1] == 2 * 10 * 56 * 4, kept


def test_swiglu_mlp_falls_back_when_adapters_are_off_or_merged():
    plain, fused = swiglu_pair(0.0)
    x = torch.randn(2, 24)
    with fused.disable_adapter(), plain.disable_adapter():
        assert torch.allclose(fused(x), plain(x))
    fused.merge_adapter()
    assert torch.allclose(fused(x), plain(x), atol=1e-5)
    fused.unmerge_adapter()
    fused.eval(), plain.eval()  # dropout off in eval mode
    assert torch.allclose(fused(x), plain(x), atol=1e-5)


class Three(torch.nn.Module):
    """Three projections of one input, as q, k and v are."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(24, 24, bias=False) for _ in range(3))

    def forward(self, x):
        return self.q(x) + self.k(x) * self.v(x)


def test_projections_of_one_input_share_its_cast_and_keep_one_copy():
    """Under bf16 autocast the float32 input is cast once for q, k and v, and backward keeps that
    one copy (three before); the result equals peft's. An input changed in place is cast again."""
    torch.manual_seed(0)
    plain = get_peft_model(Three(), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k", "v"],
                                               init_lora_weights=False))
    fused = get_peft_model(Three(), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k", "v"],
                                               init_lora_weights=False))
    fused.load_state_dict(plain.state_dict())
    assert fused_layers(fused) == 3
    x = torch.randn(2, 5, 24, requires_grad=True)
    copies = set()

    def pack(t):
        if t.dtype == torch.bfloat16 and t.shape == (10, 24):
            copies.add(t.untyped_storage().data_ptr())
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fused(x)
    assert len(copies) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.allclose(out.float(), plain(x).float(), atol=2e-2, rtol=2e-2)  # (bf16 rounding)
        layer = fused.base_model.model.k
        before = layer(x)
        with torch.no_grad():
            x.add_(1.0)
        after = layer(x)
    assert not torch.allclose(after.float(), before.float(), atol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (a new region: autocast keeps its casts of a leaf x)
        assert torch.allclose(after.float(), plain.base_model.model.k(x).float(), atol=2e-2, rtol=2e-2)


def fused_layers(model) -> int:
    return fast_lora.enable(model, torch.bfloat16)[0]

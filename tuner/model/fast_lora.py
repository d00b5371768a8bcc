"""One autograd function for a LoRA linear layer: y = x W^T + b + s (dropout(x) A^T) B^T.

peft runs it as separate modules (base linear, dropout, A, B, a scaling multiply, an add),
each with its own autograd node and temporaries, and under autocast casts the frozen W
every call. Here forward and backward are written out: the adapter matmuls get the scale
folded in, the output is accumulated in place, the base weight is used in the compute
dtype it is stored in (enable() stores it so), nothing is computed for the
frozen W's gradient, and only dropout(x) and x A^T are saved.

    forward:  xa = xd A^T;  y = x W^T + b + s xa B^T
    backward: gxa = s g B;  dB = s g^T xa;  dA = gxa^T xd;  dx = g W;  dxd = gxa A

Used for plain nn.Linear bases with one active adapter (not 4-bit, not DoRA, not merged), in
one process or DDP; everything else keeps peft's forward. Tested against peft's path.

The SwiGLU MLP of Llama-style models (down(silu(gate(x)) * up(x))) goes one step further:
the SiLU, the product and the LoRA down projection are one function that saves only gate(x)
and up(x) and recomputes the product in backward (as Unsloth and Liger do). Autograd would
keep silu(gate), the product and the dropped product besides: two fewer tensors of the MLP's
width per layer and token, about a quarter of a LoRA step's activations.
"""

from __future__ import annotations

import types
import weakref

import torch
import torch.nn.functional as F


def _linear_and_adapter(x, xd, weight, bias, lora_a, lora_b, scaling, dtype):
    """y = x W^T + b + s (xd A^T) B^T in `dtype` (2-D x and xd); returns (y, xd A^T)."""
    w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
    xa = xd @ a.t()
    y = torch.addmm(bias.to(dtype), x, w.t()) if bias is not None else x @ w.t()
    y.addmm_(xa, b.t(), alpha=scaling)
    return y, xa


def _adapter_gradients(g, xd, xa, lora_a, lora_b, scaling, dtype):
    """For y's gradient g (2-D, in `dtype`): (g's gradient through the adapter at xd A^T, i.e.
    s g B, and the gradients of A and B in their own dtypes)."""
    gxa = (g @ lora_b.to(dtype)).mul_(scaling)
    grad_b = (g.t() @ xa).mul_(scaling).to(lora_b.dtype)
    grad_a = (gxa.t() @ xd).to(lora_a.dtype)
    return gxa, grad_a, grad_b


_last_cast: list = [None, 0, None, None]  # (weak reference to x, x's version, dtype, x in dtype as 2-D)


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as 2-D in `dtype`. The q, k and v projections (and gate and up) read the same x: the copy made
    for the first is handed to the others, so each layer casts it once, and backward keeps one copy,
    not three. Only while x is that same tensor, unchanged since (its version)."""
    if x.dtype == dtype:
        return x.reshape(-1, x.shape[-1])
    ref, version, last_dtype, cast = _last_cast
    if ref is not None and ref() is x and version == x._version and last_dtype == dtype:
        return cast
    cast = x.reshape(-1, x.shape[-1]).to(dtype)
    _last_cast[:] = weakref.ref(x), x._version, dtype, cast
    return cast


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_dropped, weight, bias, lora_a, lora_b, scaling, dtype):
        shape = x.shape
        x2 = _cast(x, dtype)
        xd = x2 if x_dropped is x else x_dropped.reshape(-1, shape[-1]).to(dtype)
        y, xa = _linear_and_adapter(x2, xd, weight, bias, lora_a, lora_b, scaling, dtype)
        ctx.save_for_backward(xd, xa, weight, lora_a, lora_b)
        ctx.scaling, ctx.dtype, ctx.same = scaling, dtype, x_dropped is x
        ctx.x_dtype, ctx.xd_dtype = x.dtype, x_dropped.dtype
        return y.view(*shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        xd, xa, weight, lora_a, lora_b = ctx.saved_tensors
        dtype, s = ctx.dtype, ctx.scaling
        g = grad.reshape(-1, grad.shape[-1]).to(dtype)
        a = lora_a.to(dtype)
        gxa, grad_a, grad_b = _adapter_gradients(g, xd, xa, lora_a, lora_b, s, dtype)
        shape = (*grad.shape[:-1], -1)
        grad_x = grad_xd = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight.to(dtype)
            if ctx.same:  # no dropout: both paths reach x, add them here
                grad_x.addmm_(gxa, a)
            grad_x = grad_x.view(shape).to(ctx.x_dtype)
        if not ctx.same and ctx.needs_input_grad[1]:
            grad_xd = (gxa @ a).view(shape).to(ctx.xd_dtype)
        return grad_x, grad_xd, None, None, grad_a, grad_b, None, None


def _plain_adapter(layer) -> str | None:
    """The one active vanilla adapter of a peft LoRA layer, or None where peft's forward is needed."""
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if layer.disable_adapters or layer.merged or len(active) != 1 or active[0] in layer.lora_variant:
        return None
    base = layer.base_layer  # (no gradient is made for B's bias (peft's lora_bias) nor for a trained base)
    if (getattr(layer.lora_B[active[0]], "bias", None) is not None or base.weight.requires_grad
            or base.bias is not None and base.bias.requires_grad):
        return None
    return active[0]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def _fast_forward(self, x, *args, **kwargs):
    """peft's Linear.forward, with the vanilla-LoRA case done by _LoraLinear."""
    name = _plain_adapter(self)
    if args or kwargs or name is None:
        return self._peft_forward(x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    x_dropped = dropout(x) if not isinstance(dropout, torch.nn.Identity) else x
    base, dtype = self.base_layer, _compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return _LoraLinear.apply(x, x_dropped, base.weight, base.bias, self.lora_A[name].weight,
                                 self.lora_B[name].weight, self.scaling[name], dtype)


def _dropped(h: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """h with dropout's mask applied, computed as torch's CPU dropout does (mask / (1 - p), times h)."""
    return h * keep.to(h.dtype).div_(1 - p)


class _SwiGLULoraDown(torch.autograd.Function):
    """y = down(silu(gate) * up) with down a LoRA linear: saves gate, up (and the dropout mask
    as booleans), not silu(gate), the product or its dropped copy; backward recomputes them.

        h = silu(g) u;  hd = dropout(h);  y = h W^T + b + s (hd A^T) B^T
        dh = G W + dropout'(s G B A);  du = dh silu(g);  dg = dh u sigmoid(g) (1 + g (1 - sigmoid(g)))
    """

    @staticmethod
    def forward(ctx, gate, up, weight, bias, lora_a, lora_b, scaling, p, dtype):
        shape = gate.shape
        g, u = gate.reshape(-1, shape[-1]).to(dtype), up.reshape(-1, shape[-1]).to(dtype)
        h = F.silu(g).mul_(u)
        keep = torch.empty_like(h, dtype=torch.bool).bernoulli_(1 - p) if p > 0 else None  # nn.Dropout's draw
        y, xa = _linear_and_adapter(h, h if keep is None else _dropped(h, keep, p), weight, bias, lora_a, lora_b,
                                    scaling, dtype)
        del h
        ctx.save_for_backward(g, u, keep, xa, weight, lora_a, lora_b)
        ctx.scaling, ctx.p, ctx.dtype, ctx.in_dtypes = scaling, p, dtype, (gate.dtype, up.dtype)
        return y.view(*shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        g, u, keep, xa, weight, lora_a, lora_b = ctx.saved_tensors
        dtype, s, p = ctx.dtype, ctx.scaling, ctx.p
        G = grad.reshape(-1, grad.shape[-1]).to(dtype)
        a = lora_a.to(dtype)
        silu = F.silu(g)  # (as forward computed it: the same product)
        hd = silu * u
        gxa, grad_a, grad_b = _adapter_gradients(G, hd if keep is None else _dropped(hd, keep, p), xa, lora_a,
                                                 lora_b, s, dtype)
        del hd
        dh = G @ weight.to(dtype)
        if keep is None:
            dh.addmm_(gxa, a)
        else:
            dh.add_(_dropped(gxa @ a, keep, p))
        grad_up = (dh * silu).view(*grad.shape[:-1], -1).to(ctx.in_dtypes[1])
        del silu
        # d silu(g) / dg = sigmoid(g) (1 + g (1 - sigmoid(g))): PyTorch's kernel, one pass (autograd's own op;
        # built from seven bf16 operations it rounded at each: 2.76 -> 1.71 ms for the elementwise work of
        # SmolLM2's MLP over 970 tokens, and closer to float64)
        grad_gate = torch.ops.aten.silu_backward(dh.mul_(u), g)
        grad_gate = grad_gate.view(*grad.shape[:-1], -1).to(ctx.in_dtypes[0])
        return grad_gate, grad_up, None, None, grad_a, grad_b, None, None, None


def _swiglu_forward(self, x):
    """A Llama-style MLP's forward with the SiLU, the product and the LoRA down projection in
    one function; anything else (adapters off or merged, dropout in eval mode too) as before."""
    down = self.down_proj
    name = _plain_adapter(down)
    if name is None:
        return self._plain_forward(x)
    dropout = down.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    gate, up = self.gate_proj(x), self.up_proj(x)
    base, dtype = down.base_layer, _compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return _SwiGLULoraDown.apply(gate, up, base.weight, base.bias, down.lora_A[name].weight,
                                     down.lora_B[name].weight, down.scaling[name], p, dtype)


def _is_swiglu_mlp(module, lora_linear_type) -> bool:
    """gate_proj / up_proj / down_proj with SiLU, down_proj a LoRA linear on a plain Linear: the
    shape of LlamaMLP, MistralMLP, Qwen2MLP, Qwen3MLP... (forward: down(act(gate(x)) * up(x)))."""
    down = getattr(module, "down_proj", None)
    return (type(module).__name__.endswith("MLP") and hasattr(module, "gate_proj") and hasattr(module, "up_proj")
            and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
            and type(down) is lora_linear_type and type(down.base_layer) is torch.nn.Linear)


def enable(model, compute_dtype: torch.dtype | None = None) -> tuple[int, int]:
    """Route every eligible peft LoRA Linear through _LoraLinear and every SwiGLU MLP with a LoRA
    down projection through _SwiGLULoraDown; returns how many of each. With a 16-bit compute
    dtype, the frozen float32 weights of the LoRA layers are stored in it: autocast would cast
    them to it at every call anyway, so the results are the same, without the casts and half
    the memory."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    layers = mlps = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer) is torch.nn.Linear:
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fast_forward, module)
            weight = module.base_layer.weight
            if (compute_dtype in (torch.bfloat16, torch.float16) and weight.dtype == torch.float32
                    and not weight.requires_grad):
                weight.data = weight.data.to(compute_dtype)
            layers += 1
        elif _is_swiglu_mlp(module, LoraLinear):
            module._plain_forward = module.forward
            module.forward = types.MethodType(_swiglu_forward, module)
            mlps += 1
    return layers, mlps

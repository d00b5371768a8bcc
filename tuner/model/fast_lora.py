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
"""

from __future__ import annotations

import types

import torch


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_dropped, weight, bias, lora_a, lora_b, scaling, dtype):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        xd = x2 if x_dropped is x else x_dropped.reshape(-1, shape[-1]).to(dtype)
        w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        xa = xd @ a.t()
        y = torch.addmm(bias.to(dtype), x2, w.t()) if bias is not None else x2 @ w.t()
        y.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(xd, xa, weight, lora_a, lora_b)
        ctx.scaling, ctx.dtype, ctx.same = scaling, dtype, x_dropped is x
        ctx.x_dtype, ctx.xd_dtype = x.dtype, x_dropped.dtype
        return y.view(*shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        xd, xa, weight, lora_a, lora_b = ctx.saved_tensors
        dtype, s = ctx.dtype, ctx.scaling
        g = grad.reshape(-1, grad.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        gxa = (g @ b).mul_(s)
        grad_b = (g.t() @ xa).mul_(s).to(lora_b.dtype)
        grad_a = (gxa.t() @ xd).to(lora_a.dtype)
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


def _fast_forward(self, x, *args, **kwargs):
    """peft's Linear.forward, with the vanilla-LoRA case done by _LoraLinear."""
    active = [name for name in self.active_adapters if name in self.lora_A]
    if (self.disable_adapters or self.merged or args or kwargs or len(active) != 1
            or active[0] in self.lora_variant):
        return self._peft_forward(x, *args, **kwargs)
    name = active[0]
    dropout = self.lora_dropout[name]
    x_dropped = dropout(x) if not isinstance(dropout, torch.nn.Identity) else x
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    base = self.base_layer
    with torch.autocast(x.device.type, enabled=False):
        return _LoraLinear.apply(x, x_dropped, base.weight, base.bias, self.lora_A[name].weight,
                                 self.lora_B[name].weight, self.scaling[name], dtype)


def enable(model, compute_dtype: torch.dtype | None = None) -> int:
    """Route every eligible peft LoRA Linear through _LoraLinear; returns how many. With a 16-bit
    compute dtype, their frozen float32 weights are stored in it: autocast would cast them to
    it at every call anyway, so the results are the same, without the casts and half the memory."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer) is torch.nn.Linear:
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fast_forward, module)
            weight = module.base_layer.weight
            if (compute_dtype in (torch.bfloat16, torch.float16) and weight.dtype == torch.float32
                    and not weight.requires_grad):
                weight.data = weight.data.to(compute_dtype)
            count += 1
    return count

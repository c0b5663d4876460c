"""A LoRA linear layer's training forward and backward as one autograd function.

PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as separate modules. Under bf16 autocast that
means: the frozen base weight cast to bf16 again on every forward (autocast caches casts only of weights that
require grad), the input cast to fp32 for lora_A and back to bf16, and two extra passes over the
(tokens x out-features) output for the scaling and the sum. Here one function does it all:

    y = x W^T + (x A^T) (s B)^T          forward: one cast of x, the low-rank product added in place
    dx = g W + (g (s B)) A                backward: likewise
    dA = (g (s B))^T x,  dB = s g^T (x A^T)

with the frozen base weight cast to the compute dtype once and kept while it stays unchanged (``casts.frozen_copy``).
Autocast also keeps each layer's bf16 copy from its forward until its backward, so at the end of a forward pass all
of them are held either way (reasoned, not measured); the difference is that these copies stay between steps.
The matmuls run in the autocast dtype where autocast is on, in the weights' dtype otherwise; the gradients of A and
B come back in their own dtype (fp32).

Only the training module gets this forward (``LoraKind.attach``); a loaded adapter runs PEFT's own. Layers the
function does not cover (dropout, DoRA and other variants, several adapters, merged weights, a bias) keep PEFT's
forward. ``python bench/bench_step_parts.py lora 3`` measures what it buys on the bf16 LoRA step.
"""

from __future__ import annotations

import functools

from .casts import compute_dtype, frozen_copy


def fuse_lora_layers(model) -> int:
    """Give every plain LoRA linear layer of ``model`` (a PEFT model) the fused forward; returns how many."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for layer in model.modules():
        if isinstance(layer, Linear) and _plain(layer):
            layer.forward = functools.partial(_forward, layer)  # an instance attribute shadows Linear.forward
            count += 1
    return count


def unfuse_lora_layers(model) -> int:
    """Give every fused LoRA layer of ``model`` PEFT's own forward back; returns how many (for A/B timings)."""
    count = 0
    for layer in model.modules():
        if hasattr(layer, "lora_A") and layer.__dict__.pop("forward", None) is not None:
            count += 1
    return count


def _plain(layer) -> bool:
    """Whether the fused function computes exactly what PEFT's forward would for this layer."""
    import torch

    names = list(layer.lora_A.keys())
    if len(names) != 1 or layer.lora_variant or layer.fan_in_fan_out:
        return False
    base = layer.base_layer
    return (type(base) is torch.nn.Linear and base.bias is None and not base.weight.requires_grad
            and isinstance(layer.lora_dropout[names[0]], torch.nn.Identity))


def _forward(layer, x, *args, **kwargs):
    name = layer.active_adapters[0] if len(layer.active_adapters) == 1 else None
    if layer.disable_adapters or layer.merged or name not in layer.lora_A or args or kwargs:
        return type(layer).forward(layer, x, *args, **kwargs)
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    w = frozen_copy(layer.base_layer.weight, compute_dtype(x))
    return _function().apply(x, w, a, b, float(layer.scaling[name]))


@functools.cache
def _function():
    """The autograd Function, built on first use so that importing this module does not import torch."""
    import torch

    class LoraLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, a, b, scaling):
            dtype = w.dtype
            with torch.autocast(x.device.type, enabled=False):  # dtypes are chosen by hand
                x2 = x.reshape(-1, x.shape[-1]).to(dtype)
                a2, sb = a.to(dtype), (b * scaling).to(dtype)
                u = x2 @ a2.T
                y = (x2 @ w.T).addmm_(u, sb.T)
            ctx.save_for_backward(x2, u, w, a2, sb)
            ctx.scaling, ctx.x_shape, ctx.x_dtype, ctx.ab_dtype = scaling, x.shape, x.dtype, a.dtype
            return y.view(*x.shape[:-1], -1)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):
            x2, u, w, a2, sb = ctx.saved_tensors
            with torch.autocast(x2.device.type, enabled=False):
                g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
                gu = g @ sb  # (tokens, rank)
                dx = (g @ w).addmm_(gu, a2) if ctx.needs_input_grad[0] else None
                da = (gu.T @ x2).to(ctx.ab_dtype) if ctx.needs_input_grad[2] else None
                db = (g.T @ u).to(ctx.ab_dtype).mul_(ctx.scaling) if ctx.needs_input_grad[3] else None
            dx = None if dx is None else dx.view(ctx.x_shape).to(ctx.x_dtype)
            return dx, None, da, db, None

    return LoraLinear

"""A bf16 model's linear weights packed once into oneDNN's blocked layout, for the forwards of many tokens on a CPU.

``F.linear`` on a bf16 weight hands oneDNN a plain row-major matrix, which it reorders into its blocked layout on
every call: for a prefill of a few dozen tokens (a chat question joining a server's batch) that reorder costs as
much as the product. Packing each weight once, as PyTorch's own compiler does for frozen CPU models
(``torch.ops.mkldnn._reorder_linear_weight``), leaves only the product; the results are the same numbers
(``tests/test_packed_weights.py``). ``python bench/bench_prefill.py`` times prefills with and without them.

Built with a bf16 model's quantized decode weights (``decode_weights.build``), so only where ``model.decode_weights``
is not ``model`` (the plain reference path), and read wherever the decode loop runs the model's own weights
(prefill, decode steps of more than ``decode_weights.MAX_ROWS`` rows). The packed copy costs the memory of the
layers' weights once more.

Packed in bf16 where bf16 products are native and fast. A CPU can report native bf16 and multiply it slower than fp32
(``load.bf16_speedup_cpu``); there the layers are packed in fp32 instead (``model.prefill_dtype``, which
``load.prefill_dtype_for`` resolves): each product takes its bf16 input in fp32 and rounds its output back to bf16,
so the forward stays a bf16 one around products that differ from bf16's only in the order of their sums, at twice
the packed copy's memory. ``python bench/bench_prefill.py`` and ``bench/bench_prefill_dtype.py`` time both packings
on the host they run on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedLinear:
    """``x @ W.T`` with W packed for oneDNN; the product in W's dtype, the output in x's."""

    weight: torch.Tensor  # an mkldnn tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.mkldnn._linear_pointwise(x.to(self.weight.dtype), self.weight, None, "none", [], "")
        return out.to(x.dtype)  # no copy where the dtypes agree


@dataclass
class PackedBlock:
    """One transformer block's projections, packed; a block whose modules are not plain linear layers has none.
    q|k|v and gate|up are each one product on the weights stacked: the same numbers as the products apart (a test
    holds them equal), for fewer calls, which is most of a short prefill's fixed cost."""

    qkv: PackedLinear
    o: PackedLinear
    gate_up: PackedLinear
    down: PackedLinear


def native_bf16_cpu() -> bool:
    """Whether oneDNN computes bf16 natively on this CPU (AVX512-BF16 or AMX); ``load.bf16_supported`` asks it."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def available() -> bool:
    """Whether this PyTorch build packs bf16 weights for oneDNN on a CPU that computes bf16 natively."""
    ops = torch.ops.mkldnn
    return native_bf16_cpu() and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")


ATTRIBUTE = "engrain_prefill_dtype"  # on the model: "bfloat16" or "float32" (``load.prefill_dtype_for`` resolves it)


def pack(*modules: torch.nn.Linear, dtype: torch.dtype | None = None) -> PackedLinear:
    """``modules``' weights stacked (their outputs side by side, in this order) and packed, in ``dtype`` (the
    weights' own when None)."""
    weight = torch.cat([m.weight.detach() for m in modules])
    return PackedLinear(torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype or weight.dtype), 64))


def build(model, dtype: torch.dtype | None = None) -> list[PackedBlock | None]:
    """Per block of a Llama model its projections packed in ``dtype`` (when None, the model's ``ATTRIBUTE`` as
    ``load_model`` set it; bf16 for a model it did not load); None for a block whose modules are not plain bias-free
    linear layers (a PEFT LoRA layer, a memory layer beside the MLP): those run as the model's modules."""
    dtype = dtype or getattr(torch, getattr(model, ATTRIBUTE, "bfloat16"))
    out: list[PackedBlock | None] = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        modules = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
        plain = type(m).__name__ == "LlamaMLP" and all(type(x) is torch.nn.Linear and x.bias is None for x in modules)
        out.append(PackedBlock(pack(a.q_proj, a.k_proj, a.v_proj, dtype=dtype), pack(a.o_proj, dtype=dtype),
                               pack(m.gate_proj, m.up_proj, dtype=dtype), pack(m.down_proj, dtype=dtype))
                   if plain else None)
    return out

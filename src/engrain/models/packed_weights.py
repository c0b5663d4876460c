"""bf16 linear weights packed once into oneDNN's blocked layout, for the forwards of many tokens on a CPU.

``F.linear`` on a bf16 weight hands oneDNN a plain row-major matrix, which it reorders into its blocked layout on
every call: for a prefill of a few dozen tokens (a chat question joining a server's batch) that reorder costs as
much as the product. Packing each weight once, as PyTorch's own compiler does for frozen CPU models
(``torch.ops.mkldnn._reorder_linear_weight``), leaves only the product; the results are the same numbers
(``tests/test_packed_weights.py``). ``python bench/bench_prefill.py`` times prefills with and without them.

Built with a bf16 model's quantized decode weights (``decode_weights.build``), so only where ``model.decode_weights``
is not ``model`` (the plain reference path), and read wherever the decode loop runs the model's own weights
(prefill, decode steps of more than ``decode_weights.MAX_ROWS`` rows). The packed copy costs the memory of the
layers' weights once more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedLinear:
    """``x @ W.T`` with W packed for oneDNN."""

    weight: torch.Tensor  # an mkldnn tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")


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


def pack(*modules: torch.nn.Linear) -> PackedLinear:
    """``modules``' weights stacked (their outputs side by side, in this order) and packed."""
    weight = torch.cat([m.weight.detach() for m in modules])
    return PackedLinear(torch.ops.mkldnn._reorder_linear_weight(weight, 64))


def build(model) -> list[PackedBlock | None]:
    """Per block of a Llama model its packed projections; None for a block whose modules are not plain bias-free
    linear layers (a PEFT LoRA layer, a memory layer beside the MLP): those run as the model's modules."""
    out: list[PackedBlock | None] = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        modules = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
        plain = type(m).__name__ == "LlamaMLP" and all(type(x) is torch.nn.Linear and x.bias is None for x in modules)
        out.append(PackedBlock(pack(a.q_proj, a.k_proj, a.v_proj), pack(a.o_proj), pack(m.gate_proj, m.up_proj),
                               pack(m.down_proj)) if plain else None)
    return out

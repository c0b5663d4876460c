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

A CPU can also multiply int8 several times faster than either float (AVX512-VNNI through ``torch._int_mm``); there
``model.prefill_dtype: int8`` takes W8A8 products (``Int8Product``) for all but the down projections (packed in
fp32, ``INT8_FLOAT_PRODUCTS``): each weight row in int8 with its own scale, each token's input quantized to int8 at
run time with its own scale, after SmoothQuant's (Xiao et al. 2023) per-channel smoothing, which moves the inputs'
outlier channels into the weights so that one scale per token does not flatten the rest. The smoothing is measured
on the package's replay prompts (``calibration_ids``) through the model's own layers when the products are built.
Rounding to int8 moves logits more than fp32's reordered sums do; experiments/answering's int8 rows measure what it
does to answers.
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


INT8_ROW_BLOCK = 256  # rows of an int8 product's input quantized and multiplied at a time


@dataclass
class Int8Product:
    """``x @ W.T`` as int8 x int8 (W8A8): ``weight`` (in, out) int8 with one ``scale`` per output, ``x`` divided by
    the smoothing per input channel (``inv_smooth``, folded into the weight) and quantized per token; the output in
    x's dtype."""

    weight: torch.Tensor
    scale: torch.Tensor
    inv_smooth: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] <= INT8_ROW_BLOCK:
            return self._rows(flat).view(*x.shape[:-1], -1)
        # A batch of prompts in blocks of rows: each block's fp32 and int32 intermediates stay in the CPU's cache,
        # where the whole batch's would make every elementwise pass a trip to memory.
        out = torch.empty(flat.shape[0], self.weight.shape[1], dtype=x.dtype)
        for a in range(0, flat.shape[0], INT8_ROW_BLOCK):
            out[a:a + INT8_ROW_BLOCK] = self._rows(flat[a:a + INT8_ROW_BLOCK])
        return out.view(*x.shape[:-1], -1)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        smoothed = x.float() * self.inv_smooth
        step = smoothed.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
        q = (smoothed / step).round().to(torch.int8)
        return (torch._int_mm(q, self.weight).float() * step * self.scale).to(x.dtype)


@dataclass
class PackedBlock:
    """One transformer block's projections, packed; a block whose modules are not plain linear layers has none.
    q|k|v and gate|up are each one product on the weights stacked: the same numbers as the products apart (a test
    holds them equal), for fewer calls, which is most of a short prefill's fixed cost."""

    qkv: PackedLinear | Int8Product
    o: PackedLinear | Int8Product
    gate_up: PackedLinear | Int8Product
    down: PackedLinear | Int8Product


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


ATTRIBUTE = "engrain_prefill_dtype"  # on the model: "bfloat16", "float32" or "int8" (``load.prefill_dtype_for``)
CALIBRATION = "engrain_calibration_ids"  # on an int8 model: the token ids its smoothing is measured on
CALIBRATION_TOKENS = 512
SMOOTHING_ALPHA = 0.5  # SmoothQuant's migration strength: the outliers' range split evenly between input and weight


def int8_available() -> bool:
    """Whether this PyTorch build multiplies int8 matrices on a CPU (``torch._int_mm``)."""
    try:
        return torch._int_mm(torch.ones(32, 32, dtype=torch.int8), torch.ones(32, 32, dtype=torch.int8))[0, 0] == 32
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def calibration_ids(tokenizer) -> torch.Tensor:
    """The first ``CALIBRATION_TOKENS`` tokens of the package's replay prompts file as it is written (its comment
    header, then everyday requests; none of a user's documents), as a (1, T) tensor: what an int8 model's smoothing
    is measured on. Read whole rather than through ``train.replay.replay_prompts`` (models may not import train),
    and the measured int8 rows were calibrated on exactly this text."""
    from importlib import resources

    text = resources.files("engrain").joinpath("data", "replay_prompts.txt").read_text(encoding="utf-8")
    return tokenizer(text, return_tensors="pt").input_ids[:, :CALIBRATION_TOKENS]


def pack(*modules: torch.nn.Linear, dtype: torch.dtype | None = None) -> PackedLinear:
    """``modules``' weights stacked (their outputs side by side, in this order) and packed, in ``dtype`` (the
    weights' own when None)."""
    weight = torch.cat([m.weight.detach() for m in modules])
    return PackedLinear(torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype or weight.dtype), 64))


def pack_int8(*modules: torch.nn.Linear, input_amax: torch.Tensor | None = None,
              alpha: float = SMOOTHING_ALPHA) -> Int8Product:
    """``modules``' weights stacked (outputs side by side) as one W8A8 product, smoothed by ``input_amax`` (each
    input channel's largest magnitude on the calibration text) where given."""
    w = torch.cat([m.weight.detach().float() for m in modules])
    smooth = torch.ones(w.shape[1])
    if input_amax is not None:
        smooth = input_amax.float().clamp_min(1e-5) ** alpha / w.abs().amax(0).clamp_min(1e-5) ** (1 - alpha)
    w = w * smooth
    scale = w.abs().amax(1).clamp_min(1e-8) / 127
    return Int8Product((w / scale[:, None]).round().to(torch.int8).t().contiguous(), scale, 1 / smooth)


def input_amax(model, ids: torch.Tensor) -> dict[torch.nn.Module, torch.Tensor]:
    """Per projection of every block, the largest magnitude each input channel takes over ``ids`` (1, T), through
    the model's own modules (the smoothing's measure)."""
    amax: dict[torch.nn.Module, torch.Tensor] = {}

    def hook(module, args):
        a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
        amax[module] = torch.maximum(amax[module], a) if module in amax else a

    modules = [m for layer in model.model.layers for m in (*layer.self_attn.children(), *layer.mlp.children())
               if isinstance(m, torch.nn.Linear)]
    hooks = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        with torch.inference_mode():
            model(ids.to(model.device))
    finally:
        for h in hooks:
            h.remove()
    return amax


# The projections an int8 model keeps in fp32: with the down projections in fp32 the base model's general answers
# stayed within the noise of fp32's, with the q/k/v or the gate/up ones instead they did not (experiments/answering's
# general-qa-int8 results).
INT8_FLOAT_PRODUCTS = ("down",)


def build(model, dtype: torch.dtype | str | None = None,
          float_products: tuple[str, ...] = INT8_FLOAT_PRODUCTS) -> list[PackedBlock | None]:
    """Per block of a Llama model its projections packed in ``dtype`` (``"int8"``: W8A8 products smoothed on the
    model's ``CALIBRATION`` ids where it has them, but ``float_products``, among qkv, o, gate_up and down, packed in
    fp32; when None, the model's ``ATTRIBUTE`` as ``load_model`` set it; bf16 for a model it did not load); None for
    a block whose modules are not plain bias-free linear layers (a PEFT LoRA layer, a memory layer beside the MLP):
    those run as the model's own modules."""
    dtype = dtype or getattr(model, ATTRIBUTE, "bfloat16")
    int8 = dtype == "int8"
    if int8:
        ids = getattr(model, CALIBRATION, None)
        amax = input_amax(model, ids) if ids is not None else {}
    else:
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype

    def product(name: str, *modules):
        if int8 and name not in float_products:
            return pack_int8(*modules, input_amax=amax.get(modules[0]))
        return pack(*modules, dtype=torch.float32 if int8 else dtype)

    out: list[PackedBlock | None] = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        modules = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
        plain = type(m).__name__ == "LlamaMLP" and all(type(x) is torch.nn.Linear and x.bias is None for x in modules)
        out.append(PackedBlock(product("qkv", a.q_proj, a.k_proj, a.v_proj), product("o", a.o_proj),
                               product("gate_up", m.gate_proj, m.up_proj), product("down", m.down_proj))
                   if plain else None)
    return out

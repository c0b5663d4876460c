"""The decode loop's weights for steps of a few tokens: 4-bit groups or int8 rows, one product per fused projection.

A decode step at batch 1 does little but read every weight once, so it runs at the speed the weights are read. The
model's own weights are 2 bytes each in bf16 and 4 in fp32; this keeps a second copy of each linear layer's weight
as int8 with one scale per output row (weight-only quantization: the activations stay in the model's dtype), read by
PyTorch's int8 matrix-vector kernel (``torch._weight_int8pack_mm``), and fuses the projections that read the same
input (q, k and v; gate and up) into one product each. Prefill, many tokens per row, keeps the model's own weights:
it is bound by the matmuls, not by reading, and is exact. So do decode steps of more than ``MAX_ROWS`` rows, where
int8's matrix-vector kernel, repeated per row, falls behind a matmul; a row's tokens can then differ by the
rounding of the two paths, as they can between bf16 and fp32.

``int4`` reads fewer bytes again where it loses nothing: a weight whose every group of ``GROUP`` inputs already
lies on 16 evenly spaced levels (a model converted from a GGUF of Q4_1 blocks, as the embedded model is) is kept
as those levels, packed two to a byte, and read by PyTorch's 4-bit kernel
(``torch.ops.aten._weight_int4pack_mm_for_cpu``); each group's level spacing and offset are fitted by least squares,
so the copy reproduces the weights the GGUF holds up to the rounding of those two numbers to the activations' dtype.
Any other weight (a merged LoRA's layers) is quantized to int8 rows. The output head is int8 rows too, except where
bf16 weights are packed for oneDNN (``packed_weights``): there it reads its packed bf16 weight, exact and no slower.

Which weights a model decodes with is set when it is loaded (``load_model``'s ``decode_weights``;
``model.decode_weights`` in engrain.yaml) and carried on the model as ``engrain_decode_weights``: ``int4``,
``int8`` or ``model``. Speed: ``python bench/bench_answer_speed.py``; answers against the reference path:
experiments/answering.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import packed_weights

ATTRIBUTE = "engrain_decode_weights"  # on the model: "int4", "int8" or "model"
QUANTIZED = ("int4", "int8")
GROUP = 32  # inputs per 4-bit group: a Q4_1 block's size
# Tokens per forward up to which quantized products are used: the bench's rows sweep (bench/bench_answer_speed.py)
# has int8 ahead at 8 rows and behind the model's own weights at 16.
MAX_ROWS = 8
_SAMPLE = 4093  # every this-many-th element of a weight enters its fingerprint


@dataclass
class Int8Linear:
    """``x @ W.T`` with W stored as int8 rows times one scale per row."""

    weight: torch.Tensor  # (out, in) int8
    scale: torch.Tensor  # (out,) in the activations' dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return torch._weight_int8pack_mm(flat, self.weight, self.scale).view(*x.shape[:-1], -1)


def quantize(weight: torch.Tensor, dtype: torch.dtype) -> Int8Linear:
    """Symmetric int8 per output row: each row scaled so its largest magnitude maps to 127."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Linear(q.contiguous(), scale.to(dtype))


@dataclass
class Int4Linear:
    """``x @ W.T`` with W stored as 4-bit levels per group of ``GROUP`` inputs: (level - 8) * spacing + offset."""

    weight: torch.Tensor  # packed by _convert_weight_to_int4pack_for_cpu
    spacing_offset: torch.Tensor  # (in / GROUP, out, 2) in the activations' dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, GROUP, self.spacing_offset)
        return out.view(*x.shape[:-1], -1)


def on_4bit_grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(levels, spacing, offset) with ``levels * spacing + offset`` equal to ``weight`` within its dtype's rounding,
    per group of ``GROUP`` inputs (levels 0-15, each group's spacing and offset fitted by least squares to its
    values); None where the weight is not 4-bit to begin with."""
    out, inputs = weight.shape
    if inputs % GROUP or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return None
    g = weight.detach().float().view(out, inputs // GROUP, GROUP)
    lo = g.amin(-1, keepdim=True)
    step = ((g.amax(-1, keepdim=True) - lo) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    levels = torch.round((g - lo) / step).clamp_(0, 15)
    centred = levels - levels.mean(-1, keepdim=True)
    spacing = (centred * g).sum(-1, keepdim=True) / (centred * centred).sum(-1, keepdim=True).clamp(min=1)
    offset = g.mean(-1, keepdim=True) - spacing * levels.mean(-1, keepdim=True)
    # All the fit may miss is the weight's rounding to its dtype and float32's in the fit itself; a weight not on
    # 4-bit levels misses by up to half a level (a thirtieth of its group's range), several times the tolerance.
    eps = max(2 * torch.finfo(weight.dtype).eps, 8 * torch.finfo(torch.float32).eps)
    tolerance = eps * g.abs().amax(-1, keepdim=True)
    if bool(((levels * spacing + offset - g).abs() > tolerance).any()):
        return None
    return levels.view(out, inputs), spacing[..., 0], offset[..., 0]


def quantize4(weight: torch.Tensor, dtype: torch.dtype) -> Int4Linear | None:
    """The weight as packed 4-bit levels where it lies on them (``on_4bit_grid``), else None."""
    grid = on_4bit_grid(weight)
    if grid is None:
        return None
    levels, spacing, offset = grid
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.to(torch.int32).contiguous(), 1)
    # The kernel computes (level - 8) * spacing + zero.
    pairs = torch.stack([spacing, offset + 8 * spacing], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return Int4Linear(packed, pairs)


@dataclass
class Block:
    """One transformer block's fused quantized projections; None where the block's modules are not plain linear
    layers (a PEFT LoRA layer being trained, a memory layer beside the MLP): those run as the model's modules."""

    qkv: Int8Linear | Int4Linear | None
    o: Int8Linear | Int4Linear | None
    gate_up: Int8Linear | Int4Linear | None
    down: Int8Linear | Int4Linear | None


@dataclass
class DecodeWeights:
    blocks: list[Block]
    head: Int8Linear | Int4Linear | packed_weights.PackedLinear | None
    packed: list | None = None  # per block, packed_weights.PackedBlock (or None): bf16 models on a CPU only


def _plain(*modules) -> bool:
    return all(type(m) is torch.nn.Linear and m.bias is None for m in modules)


def _quantized(modules, dtype, mode: str) -> Int8Linear | Int4Linear:
    """The modules' weights stacked into one product: 4-bit where ``mode`` is int4 and they lie on 4-bit levels,
    int8 rows otherwise."""
    weight = torch.cat([m.weight for m in modules]) if len(modules) > 1 else modules[0].weight
    return (mode == "int4" and quantize4(weight, dtype)) or quantize(weight, dtype)


def build(model, mode: str = "int8") -> DecodeWeights:
    """The quantized weights of a Llama model (``LlamaForCausalLM``): per block q|k|v, o, gate|up and down, and the
    head; ``mode`` ``int4`` keeps 4-bit levels where a weight has them (``on_4bit_grid``), ``int8`` never."""
    dtype = model.model.embed_tokens.weight.dtype
    blocks = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        attn_ok = _plain(a.q_proj, a.k_proj, a.v_proj, a.o_proj)
        mlp_ok = type(m).__name__ == "LlamaMLP" and _plain(m.gate_proj, m.up_proj, m.down_proj)
        blocks.append(Block(qkv=_quantized([a.q_proj, a.k_proj, a.v_proj], dtype, mode) if attn_ok else None,
                            o=_quantized([a.o_proj], dtype, mode) if attn_ok else None,
                            gate_up=_quantized([m.gate_proj, m.up_proj], dtype, mode) if mlp_ok else None,
                            down=_quantized([m.down_proj], dtype, mode) if mlp_ok else None))
    packed = packed_weights.build(model) if dtype == torch.bfloat16 and packed_weights.available() else None
    head = None
    if _plain(model.lm_head):
        # Where bf16 weights are packed for oneDNN, the head keeps them: its product reads twice int8's bytes, yet
        # runs as fast at one row and faster at several (int8's kernel is bound by unpacking, not by reading), and
        # its logits carry no int8 rounding. ``python bench/bench_decode_step.py`` times both. It stays bf16 where
        # the layers are packed in fp32 (``model.prefill_dtype``): every decode step reads it, at one row.
        head = packed_weights.pack(model.lm_head) if packed is not None else _quantized([model.lm_head], dtype, mode)
    return DecodeWeights(blocks, head, packed)


def _weights(model) -> list[torch.Tensor]:
    out = []
    for layer in model.model.layers:
        out += [m.weight for m in (*layer.self_attn.children(), *layer.mlp.children()) if type(m) is torch.nn.Linear]
    return out + [model.lm_head.weight]


def fingerprint(model) -> tuple:
    """Where each linear weight lives and a sample of its values: changes when weights are replaced or trained in
    place (a merge, a training step between checkpoint evaluations), so the quantized copy is never stale."""
    weights = _weights(model)
    sums = torch.stack([w.detach().reshape(-1)[::_SAMPLE].float().sum() for w in weights])
    return tuple(w.data_ptr() for w in weights), tuple(sums.tolist())


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def for_model(model) -> DecodeWeights | None:
    """The model's quantized decode weights when it was loaded to decode with them (and runs on a CPU, where the
    kernels are), built on first use and rebuilt when the weights or the mode have changed since; None otherwise."""
    mode = getattr(model, ATTRIBUTE, "model")
    if mode not in QUANTIZED or model.model.embed_tokens.weight.device.type != "cpu":
        return None
    key = (mode, getattr(model, packed_weights.ATTRIBUTE, None), fingerprint(model))
    cached = _CACHE.get(model)
    if cached is None or cached[0] != key:
        with torch.inference_mode():
            cached = (key, build(model, mode))
        _CACHE[model] = cached
    return cached[1]


def mlp(layer, x: torch.Tensor, block: Block | None, packed=None) -> torch.Tensor:
    """The block's MLP on ``x``: fused quantized gate|up then down where the block has them, else the model's own
    weights (``packed``: the block's ``packed_weights.PackedBlock``, the same products without a reorder per call)."""
    if (block is None or block.gate_up is None) and packed is not None:
        gate, up = packed.gate_up(x).chunk(2, dim=-1)
        return packed.down(layer.mlp.act_fn(gate).mul_(up))  # in place: the activation is a fresh tensor
    if block is None or block.gate_up is None:
        return layer.mlp(x)
    gate, up = block.gate_up(x).chunk(2, dim=-1)
    return block.down(layer.mlp.act_fn(gate) * up)


def qkv(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block: Block | None, packed=None):
    """q and k of ``x`` (B, T, hidden) with the rotary embedding applied, and v: each (B, heads, T, head_dim)."""
    bsz, t, _ = x.shape
    hd = attn.head_dim
    if (block is None or block.qkv is None) and packed is None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        q, k, v = (p(x).view(bsz, t, -1, hd).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v
    heads = attn.q_proj.out_features // hd
    kv = attn.k_proj.out_features // hd
    product = block.qkv if block is not None and block.qkv is not None else packed.qkv  # q|k|v side by side
    fused = product(x).view(bsz, t, heads + 2 * kv, hd).transpose(1, 2)
    # The rotary embedding of q and k in one pass (they sit side by side in the fused output).
    qk, v = fused[:, :heads + kv], fused[:, heads + kv:]
    qk = rope(qk, cos[:, None], sin[:, None])
    return qk[:, :heads], qk[:, heads:], v


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of ``x`` (..., head_dim) as ``apply_rotary_pos_emb`` computes it: x * cos +
    rotate_half(x) * sin, with ``cos`` and ``sin`` broadcast against ``x``."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def norm(module, x: torch.Tensor, lean: bool) -> torch.Tensor:
    """An RMSNorm of the model (``LlamaRMSNorm``) on ``x``. ``lean`` (the quantized path): one fused op (it accumulates
    in fp32, as the module does, but multiplies by the weight before rounding); else the module itself."""
    if not lean:
        return module(x)
    return F.rms_norm(x, (x.shape[-1],), module.weight, module.variance_epsilon)


def out(attn, x: torch.Tensor, block: Block | None, packed=None) -> torch.Tensor:
    if block is not None and block.o is not None:
        return block.o(x)
    return attn.o_proj(x) if packed is None else packed.o(x)


def head(model, x: torch.Tensor, weights: DecodeWeights | None, few_rows: bool = True) -> torch.Tensor:
    """The output head: the decode weights' copy in a forward of few rows (``few_rows``), and in any forward where
    that copy is the packed bf16 weight (the model's own product without oneDNN's reorder per call); the model's own
    head otherwise."""
    product = weights.head if weights is not None else None
    if product is None or not (few_rows or isinstance(product, packed_weights.PackedLinear)):
        return model.lm_head(x)
    return product(x)



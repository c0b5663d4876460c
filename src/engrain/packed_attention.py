"""Attention for packed training rows that computes each example's block alone.

A packed row holds several examples one after another; position ids restart at 0 where an example starts.
Transformers turns that into a block-diagonal causal mask and hands it to SDPA, which on a CPU computes the whole
row x row score matrix and throws most of it away: a 1,024-token row of 70-token examples pays for ~15x the
attention it uses. Here each example's block runs as its own causal SDPA call, so attention costs the sum of the
squared example lengths instead of the squared row length, and no mask is built at all.

On a GPU the trade turns over: the full score matrix of a 1,024-token row is cheap there, while one small SDPA call
per example (tens per row, in every layer, forward and backward) leaves it waiting on kernel launches. There the
row runs as one SDPA call with its block-diagonal causal mask (``_row_mask``), the same attention in one launch,
and so it does on a CPU when a long trained prefix makes the per-example calls re-read it (``use_one_call``).

``packed_rows(model)`` switches a model to this attention for the duration of a training forward (the trainer's
``loss_sum`` uses it). Keys cached in front of the row (a trained KV prefix) are seen by every example: each block
then attends to them and to its own earlier tokens. A call with a mask (generation's padding) falls back to SDPA.
"""

from __future__ import annotations

import contextlib

NAME = "engrain_packed"
_registered = False


def _segments(positions) -> list[tuple[int, int]]:
    """[start, end) of each example in a row: a new one starts wherever the position is 0."""
    starts = (positions == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    return list(zip(starts, starts[1:] + [int(positions.shape[0])]))


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs):
    """Attention interface of transformers: query (B, Hq, L, D), key/value (B, Hkv, L, D) -> (B, L, Hq, D)."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    positions = kwargs.get("position_ids")
    shared = key.shape[2] - query.shape[2]  # cached keys in front of the row (a trained prefix): every token sees them
    if attention_mask is not None or positions is None or shared < 0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if positions.shape[0] != query.shape[0]:
        positions = positions.expand(query.shape[0], -1)
    gqa = query.shape[1] != key.shape[1]
    if use_one_call(query.device.type, query.shape[2], shared):
        mask = _row_mask(positions, shared)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                             enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None

    low_precision = query.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(query.device.type)

    def block(b: int, s: int, e: int):
        q = query[b:b + 1, :, s:e]
        if not shared:
            with short_block_kernel(e - s, low_precision):
                return F.scaled_dot_product_attention(q, key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                                      dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
        k = torch.cat([key[b:b + 1, :, :shared], key[b:b + 1, :, shared + s:shared + e]], dim=2)
        v = torch.cat([value[b:b + 1, :, :shared], value[b:b + 1, :, shared + s:shared + e]], dim=2)
        allowed = torch.ones(e - s, shared + e - s, dtype=torch.bool, device=q.device)
        allowed[:, shared:] = allowed[:, shared:].tril()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scaling,
                                              enable_gqa=gqa)

    rows = []
    for b in range(query.shape[0]):
        # Positions of the row's own tokens count on from the shared keys; an example starts where they restart.
        parts = [block(b, s, e) for s, e in _segments(positions[b] - shared)]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def use_one_call(device_type: str, row_tokens: int, shared: int) -> bool:
    """One masked SDPA call for the row, or one call per example? Measured with bench/bench_packed_attention.py: on a
    GPU one call (the per-example calls wait on launches); on a CPU one call per example, unless the shared keys
    outnumber the row's tokens (a 1,024-token prefix: every example would copy and read all of them again)."""
    return device_type != "cpu" or shared >= row_tokens


MATH_MAX_TOKENS = 256


def short_block_kernel(tokens: int, low_precision: bool):
    """SDPA's plain math kernel for a short example in bf16 (the per-example path runs on a CPU), its default
    (flash) kernel otherwise. A rough timing of forward + backward with SmolLM2-135M's 9 query / 3 key heads, one
    thread beside another job: in bf16 flash took 1.6x the math kernel's time at 32 tokens and 2.7x at 128, and the
    math kernel 2x flash's at 512; in fp32 flash was as fast or faster at most lengths. In the whole bf16 LoRA step,
    on top of the fused head, it gives 5.16 -> 4.74 s (``python bench/bench_step_parts.py lora 2``)."""

    if not low_precision or tokens > MATH_MAX_TOKENS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _row_mask(positions, shared: int):
    """(B, 1, L, shared + L) bool: a token sees the shared keys, and the earlier tokens of its own example."""
    import torch

    own = positions - shared
    starts = own == 0
    starts[:, 0] = True
    example = starts.cumsum(dim=1)  # which example of the row each token belongs to
    length = own.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=own.device).tril()
    within = (example[:, :, None] == example[:, None, :]) & causal
    seen = torch.ones(own.shape[0], length, shared, dtype=torch.bool, device=own.device)
    return torch.cat([seen, within], dim=2).unsqueeze(1)


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, packed_attention)
        _registered = True


def _config(module):
    while hasattr(module, "module"):  # DDP wraps the model in .module
        module = module.module
    return module.config


@contextlib.contextmanager
def packed_rows(module):
    """Run ``module``'s attention as ``packed_attention`` inside the block (models whose attention goes through
    transformers' attention interface; the previous implementation is restored on exit)."""
    _register()
    config = _config(module)
    before = config._attn_implementation
    if before not in ("sdpa", "eager"):  # flash or flex attention already handle packed rows without waste
        yield
        return
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before

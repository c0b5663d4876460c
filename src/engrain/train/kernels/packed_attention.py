"""Attention for packed training rows that computes each example's block alone.

A packed row holds several examples one after another; position ids restart at 0 where an example starts.
Transformers turns that into a block-diagonal causal mask and hands it to SDPA, which on a CPU computes the whole
row x row score matrix and throws most of it away: a row of many short examples pays many times the attention it
uses. Here each example's causal block is computed alone, so attention costs the sum of the squared
example lengths instead of the squared row length. Examples of similar length are zero-padded into one batch
(``_grouped_row``): one attention call per group, not one per example; in bf16 short groups take a plain
matmul-softmax-matmul form that beat SDPA's kernels there (``uses_plain_attention``).

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
import functools

from .casts import compute_dtype

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

    if not shared:
        low_precision = compute_dtype(query) in (torch.bfloat16, torch.float16)
        rows = [_grouped_row(query[b], key[b], value[b], _segments(positions[b]), scaling, dropout, gqa, low_precision)
                for b in range(query.shape[0])]
        return torch.stack(rows).transpose(1, 2).contiguous(), None

    def block(b: int, s: int, e: int):
        q = query[b:b + 1, :, s:e]
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


def _grouped_row(query, key, value, segments, scaling, dropout, gqa, low_precision):
    """One row's causal attention, example by example, with examples of similar length batched into one call.

    Each group's examples are copied into a zero-padded (examples, heads, longest, dim) batch: right padding needs
    no mask beyond the causal one, as a real query never sees the keys after it. One call per group instead of
    one per example (a 1,024-token row of 60-token examples would make ~17 tiny calls per layer, forward and
    backward), and batches the plain form can take in one matmul."""
    import torch
    import torch.nn.functional as F

    def with_zero_row(t):  # (heads, L, dim) -> (heads, L + 1, dim): index L reads zeros
        return torch.cat([t, t.new_zeros(t.shape[0], 1, t.shape[2])], dim=1)

    gather, scatter, groups = _layout(tuple(segments), query.device)
    q, k, v = with_zero_row(query), with_zero_row(key), with_zero_row(value)
    outs = []
    for idx, (count, longest) in zip(gather, groups):
        batch = [t.index_select(1, idx).view(t.shape[0], count, longest, t.shape[2]).transpose(0, 1)
                 for t in (q, k, v)]
        if uses_plain_attention(longest, low_precision) and not dropout:
            out = plain_attention(*batch, scaling)
        else:
            out = F.scaled_dot_product_attention(*batch, dropout_p=dropout, is_causal=True, scale=scaling,
                                                 enable_gqa=gqa)
        outs.append(out.transpose(0, 1).reshape(out.shape[1], count * longest, out.shape[3]))
    return (torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]).index_select(1, scatter)


@functools.lru_cache(maxsize=64)
def _layout(segments: tuple, device):
    """Where each group's padded batch takes its tokens from (index L: a zero row), and where each of the row's
    tokens lands in the groups' outputs laid end to end. Examples are grouped by length: up to 64 tokens, up to
    128, 256, ...; a group pads to its own longest, so above 64 tokens padding at most doubles an example's length."""
    import torch

    length = segments[-1][1]
    by_size: dict[int, list[tuple[int, int]]] = {}
    for s, e in segments:
        by_size.setdefault(max(64, 1 << (e - s - 1).bit_length()), []).append((s, e))
    gather, groups, scatter, offset = [], [], [0] * length, 0
    for size in sorted(by_size):
        members = by_size[size]
        longest = max(e - s for s, e in members)
        idx = []
        for s, e in members:
            idx += list(range(s, e)) + [length] * (longest - (e - s))
            scatter[s:e] = range(offset, offset + e - s)
            offset += longest
        gather.append(torch.tensor(idx, device=device))
        groups.append((len(members), longest))
    return gather, torch.tensor(scatter, device=device), groups


def use_one_call(device_type: str, row_tokens: int, shared: int) -> bool:
    """One masked SDPA call for the row, or one call per example? Measured with bench/bench_packed_attention.py: on a
    GPU one call (the per-example calls wait on launches); on a CPU one call per example, unless the shared keys
    outnumber the row's tokens (a 1,024-token prefix: every example would copy and read all of them again)."""
    return device_type != "cpu" or shared >= row_tokens


PLAIN_MAX_TOKENS = 512


def uses_plain_attention(tokens: int, low_precision: bool) -> bool:
    """Forward + backward of one 1,024-token row's worth of causal attention, examples padded to ``tokens``,
    SmolLM2-135M's 9 query / 3 key heads, 2 CPU threads, in ms (``python bench/bench_attention_forms.py``):

        tokens               32    128   256   512   1024
        bf16 plain           1.6   4.1   8.4   14.4  28.4
        bf16 SDPA flash      9.5   13.7  13.2  22.7  30.7
        bf16 SDPA math       3.0   8.0   14.3  26.6  58.0
        fp32 plain           2.3   6.7   13.1  26.4  67.1
        fp32 SDPA flash      2.5   7.9   13.4  26.6  42.3

    In fp32 the plain form gains little up to 512 tokens and loses at 1,024, so fp32 keeps SDPA."""
    return low_precision and tokens <= PLAIN_MAX_TOKENS


def plain_attention(query, key, value, scaling=None):
    """Causal attention as two batched matmuls around a softmax: query (B, Hq, L, D), key/value (B, Hkv, L, D).

    Query heads ``h * g .. h * g + g - 1`` share key head ``h`` (transformers' ``repeat_kv`` order), so the
    queries of one key head are laid end to end and meet their keys in one matmul, without copying the keys for
    each query head. The softmax runs in fp32, the matmuls in the inputs' (or autocast's) dtype."""
    import torch

    b, hq, length, d = query.shape
    hkv = key.shape[1]
    scale = scaling if scaling is not None else d ** -0.5
    scores = torch.matmul(query.reshape(b, hkv, hq // hkv * length, d), key.transpose(-1, -2)) * scale
    scores = scores.view(b, hkv, hq // hkv, length, length).masked_fill(_future(length, query.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs.view(b, hkv, hq // hkv * length, length), value)
    return out.view(b, hq, length, d)


@functools.lru_cache(maxsize=16)
def _future(length: int, device):
    """(L, L) bool, True above the diagonal: the keys a causal query must not see."""
    import torch

    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)


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

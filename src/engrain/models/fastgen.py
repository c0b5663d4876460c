"""A lean decode loop for Llama-family models: static KV cache, cheap sampling, finished rows dropped.

Plain ``model.generate()`` spends most of a small model's step outside the matrix products: it grows
the KV cache by concatenation (copying the whole cache every step), sorts the full vocabulary for
top-p, rebuilds masks and runs generic processors, and keeps computing rows that already finished.
This loop runs the same modules of the same model (so weights, adapters merged into them, norms and
rotary embeddings are the model's own) with:

  - one preallocated K/V buffer per layer, written in place;
  - sampling as top-k (50, like ``generate``'s default) then top-p inside those k;
  - rows that hit a stop token removed from the batch once a quarter of it has finished, and waiting
    prompts prefilled into their places (continuous batching);
  - the prompts' common start (chat template opening and system prompt) run once and copied into
    every row's cache, not prefilled again for each prompt;
  - in bf16 on a CPU, attention as two matmuls around an fp32 softmax (``_plain_attend``) instead of SDPA,
    whose bf16 kernels are slower there (``bench/bench_attention_forms.py``);
  - ``stream.Stream`` runs the same loop for a server, rows joining and leaving as requests come and go;
  - where the model was loaded to (``decode_weights.py``), steps of a few rows read a quantized copy of the linear
    layers (4-bit groups where the weights are 4-bit already, int8 rows elsewhere), q|k|v and gate|up fused, with a
    fused RMSNorm and one rotary pass over q and k; their attention is SDPA's for one row over a short cache and the
    plain form otherwise (``DECODE_SDPA_KEYS``): a batch-1 step is bound by reading the weights and by the count of
    small ops.

Greedy decoding gives the same tokens as ``generate()`` in fp32 (tested on a tiny Llama); in bf16 the rounding of
the two attention forms differs, and experiments/answering measures the answers of bf16 and of the quantized copies
against fp32's.
``supports()`` says when it applies; ``models.generate`` falls back to ``generate()`` otherwise (other
architectures, stop strings, repetition penalty) and when ``ENGRAIN_FASTGEN=0``.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import compiled_decode, decode_weights
from .prompt_cache import MIN_TOKENS
from .stops import stop_index

SUPPORTED_TYPES = {"llama"}
TOP_K = 50


def decoder(model):
    """The Llama model to run: ``model`` itself, the model inside a PEFT LoRA wrapper, or the model a trained KV
    prefix wraps (``trained_prefix`` gives its prefix). PEFT puts its LoRA layers in place of the wrapped model's
    linear layers, so running that model's modules applies the active adapter (and honours ``disable_adapter()``),
    exactly as the wrapper's own forward does."""
    if callable(getattr(model, "prefix_kv", None)):  # memory/prefix.py's PrefixLM
        model = model.model
    active = getattr(model, "active_adapter", None)
    adapter = (getattr(model, "peft_config", None) or {}).get(active) if isinstance(active, str) else None
    return model.get_base_model() if getattr(adapter, "peft_type", None) == "LORA" else model  # PeftType is a str


def trained_prefix(model) -> list | None:
    """A trained KV prefix memory's per-layer (K, V), each (1, kv_heads, P, head_dim) in the model's dtype: what
    ``generate_many`` and ``stream.Stream`` take as ``prefix``, so every row attends it without a copy per row. None for
    any other model."""
    if not callable(getattr(model, "prefix_kv", None)):
        return None
    keys, values = model.prefix_kv()
    dtype = decoder(model).model.embed_tokens.weight.dtype
    return [(k[None].to(dtype), v[None].to(dtype)) for k, v in zip(keys, values)]


def supports(model, *, stop: list[str] | None = None, repetition_penalty: float = 1.0) -> bool:
    if os.environ.get("ENGRAIN_FASTGEN", "1") == "0" or stop or repetition_penalty != 1.0:
        return False
    model = decoder(model)
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in SUPPORTED_TYPES or type(model).__name__ != "LlamaForCausalLM":
        return False  # a PEFT wrapper or a different architecture: leave it to generate()
    inner = getattr(model, "model", None)
    return hasattr(inner, "layers") and hasattr(inner, "rotary_emb") and hasattr(inner, "embed_tokens")


def _attend(layer, x, cos, sin, k_cache, v_cache, start: int, attn_mask, prefix=None, block=None, packed=None,
            bias=None):
    """One attention block; writes this step's K/V at [start, start + T) of the layer's buffers.
    ``bias``: ``attn_mask`` as ``mask_bias`` makes it, for the plain form on a CPU (made once per forward).
    ``prefix``: this layer's shared (K, V), each (1, kv_heads, P, head_dim), attended by every row.
    ``block``: the block's quantized decode weights (``decode_weights.Block``), or None for the model's own, read
    through ``packed`` (``packed_weights.PackedBlock``) where given."""
    attn = layer.self_attn
    bsz, t, _ = x.shape
    q, k, v = decode_weights.qkv(attn, x, cos, sin, block, packed)
    k_cache[:, :, start:start + t] = k
    v_cache[:, :, start:start + t] = v
    span = attn_mask.shape[-1]  # the columns this forward attends (``attended_columns``)
    keys, values = k_cache[:, :, :span], v_cache[:, :, :span]
    if sdpa_everywhere(q.dtype, q.device):
        plain = False
    elif block is None:  # prefill: the plain form in low precision at any length (its query blocks bound its memory)
        plain = q.dtype != torch.float32
    else:  # a decode step: SDPA's kernel wins only for one row over a short cache
        plain = bsz > 1 or keys.shape[2] > DECODE_SDPA_KEYS
    if prefix is None and q.device.type == "cpu" and plain:
        out = _plain_attend(q, keys, values, bias, attn.scaling)
    elif prefix is None:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, scale=attn.scaling,
                                             enable_gqa=keys.shape[1] != q.shape[1])
    else:
        out = _attend_with_prefix(q, keys, values, prefix, attn_mask, attn.scaling)
    return decode_weights.out(attn, out.transpose(1, 2).reshape(bsz, t, -1), block, packed)


def amx_attention(device: torch.device) -> bool:
    """Whether bf16 attention goes to SDPA's kernel at every shape: on a CPU with AMX matrix tiles, where it beats
    the plain form (two matmuls around a softmax) at each prefill and decode shape timed; on CPUs without them the
    plain form wins at most shapes (``python bench/bench_decode_attention.py`` times both forms on the host it
    runs on)."""
    return device.type == "cpu" and amx_tiles()


def sdpa_everywhere(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether every attention call of a forward in ``dtype`` on ``device`` goes to SDPA's kernel (``amx_attention``),
    so that no layer takes the plain form."""
    return dtype == torch.bfloat16 and amx_attention(device)


@functools.cache
def amx_tiles() -> bool:
    """Whether this CPU has AMX matrix tiles (torch's own query, asked once)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a torch without the query: keep the forms measured without AMX
        return False


QUERY_BLOCK = 128  # prefill queries per score block (python bench/bench_prefill.py times blocks against none)
# Without AMX tiles (``amx_attention``): cached keys up to which a one-row decode step attends through SDPA rather
# than the plain form; steps of several rows always take the plain form. python bench/bench_decode_attention.py
# times both.
DECODE_SDPA_KEYS = 128


# A forward attends its cache's whole capacity, not only the columns written so far, while the capacity is at most
# this many times those columns. The whole buffer is one contiguous tensor that a bf16 matmul reads in place; a slice
# of it is copied first, and the copy costs more than the scores of the unwritten columns (``python
# bench/bench_decode_step.py`` times a decode step both ways).
WHOLE_CACHE_RATIO = 2


def attended_columns(capacity: int, total: int) -> int:
    """How many cache columns a forward attends when ``total`` of the cache's ``capacity`` columns are written by its
    end: all of them when the unwritten tail is short (``WHOLE_CACHE_RATIO``), else the written ones. The tail holds
    zeros (``_zero_caches`` and ``_merge`` zero every cache) and the causal mask keeps it out."""
    return capacity if capacity <= WHOLE_CACHE_RATIO * total else total


def mask_bias(allowed, dtype):
    """A boolean attention mask (True: attend) as a bias to add to the scores: 0 where allowed, the dtype's lowest
    value elsewhere. Adding it gives exactly what ``masked_fill`` with that value gives (a score is far smaller than
    the lowest value's rounding step, so the sum rounds to the lowest value), and on a CPU an add costs less than
    ``masked_fill`` in bf16 (``python bench/bench_prefill.py`` times the two forms of a prefill)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _plain_attend(q, keys, values, bias, scale: float):
    """Masked attention as two matmuls around an fp32 softmax, the query heads of one KV head laid end to end (no
    copy of the keys per query head). In bf16 on a CPU this beats SDPA's kernels (``python bench/bench_prefill.py``
    and ``bench/bench_decode_attention.py`` time both). ``bias``: the mask as ``mask_bias`` makes it; masked scores
    take the dtype's lowest value, not -inf: a padding query that sees no key gets a finite average, never NaN.

    A prefill runs in blocks of ``QUERY_BLOCK`` queries, each against the keys up to its last query: the mask is
    causal, so the keys after a block are never attended, and a block's scores stay small enough to be reused from
    cache by the softmax and the second matmul. A scale that is a power of two (a head size of 64) multiplies the
    queries, not the far larger scores: the products are then exactly the same."""
    if math.frexp(scale)[0] == 0.5:  # exact: only the exponent changes
        q, scale = q * scale, 1.0
    t, s = q.shape[2], keys.shape[2]
    if t <= QUERY_BLOCK:
        return _plain_block(q, keys, values, bias, scale)
    start = s - t  # columns before the new tokens: every query may attend them
    return torch.cat([_plain_block(q[:, :, a:a + QUERY_BLOCK], keys[:, :, :start + a + QUERY_BLOCK],
                                   values[:, :, :start + a + QUERY_BLOCK],
                                   bias[:, :, a:a + QUERY_BLOCK, :start + a + QUERY_BLOCK], scale)
                      for a in range(0, t, QUERY_BLOCK)], dim=2)


def _plain_block(q, keys, values, bias, scale: float):
    bsz, heads, t, hd = q.shape
    kv, s = keys.shape[1], keys.shape[2]
    g = heads // kv
    scores = torch.matmul(q.reshape(bsz, kv, g * t, hd), keys.transpose(2, 3))
    if scale != 1.0:
        scores = scores * scale
    scores = scores.view(bsz, kv, g, t, s).add_(bias[:, :, None])
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.matmul(probs.view(bsz, kv, g * t, s), values).view(bsz, heads, t, hd)


def _attend_with_prefix(q, keys, values, prefix, attn_mask, scale: float):
    """Attention over [shared prefix ; each row's own keys] without copying the prefix per row.

    The rows' queries are folded into one long query block per KV head, so the prefix K/V are read once
    per step for the whole batch (decoding a long shared context is bound by reading that cache). The two
    score blocks are normalised by one shared max and sum (a split softmax), so the result equals attention
    over the concatenated keys, without materialising the concatenation."""
    kp, vp = prefix
    bsz, heads, t, hd = q.shape
    kv = kp.shape[1]
    gt = heads // kv * t  # query rows per KV head: head h uses KV head h // group, as in repeat_kv
    qg = (q * scale).reshape(bsz, kv, gt, hd)
    folded = qg.transpose(0, 1).reshape(kv, bsz * gt, hd)
    s_prefix = torch.bmm(folded, kp[0].transpose(1, 2))  # (kv, B*gt, P)
    s_own = torch.matmul(qg, keys.transpose(2, 3))  # (B, kv, gt, S)
    own_mask = attn_mask.expand(bsz, 1, t, keys.shape[2]).repeat(1, 1, gt // t, 1)  # (B, 1, gt, S)
    s_own = s_own.masked_fill(~own_mask, float("-inf"))

    def unfold(x):  # (kv, B*gt, ...) -> (B, kv, gt, ...)
        return x.view(kv, bsz, gt, *x.shape[2:]).transpose(0, 1)

    def fold(x):  # (B, kv, gt, ...) -> (kv, B*gt, ...)
        return x.transpose(0, 1).reshape(kv, bsz * gt, *x.shape[3:])

    top = torch.maximum(unfold(s_prefix.amax(-1)), s_own.amax(-1))  # (B, kv, gt)
    e_prefix = s_prefix.sub_(fold(top)[..., None]).exp_()
    e_own = s_own.sub_(top[..., None]).exp_()
    denom = unfold(e_prefix.sum(-1)) + e_own.sum(-1)
    out = unfold(torch.bmm(e_prefix, vp[0])) + torch.matmul(e_own, values)
    return (out / denom[..., None]).reshape(bsz, heads, t, hd)


def _forward(model, ids, positions, caches, start: int, key_mask, prefix=None, quant=None):
    """Run the decoder on ``ids`` (B, T) at cache offset ``start``; returns last-position logits (B, V).
    ``prefix``: per layer, a shared (K, V) every row attends before its own keys (or None). ``quant``: the model's
    quantized decode weights (``decode_weights.for_model``), used when the forward has few tokens."""
    inner = model.model
    x = inner.embed_tokens(ids)
    cos, sin = inner.rotary_emb(x, positions)
    bsz, t = ids.shape
    span = attended_columns(caches[0][0].shape[2], start + t)
    # Boolean mask (B, 1, T, span): causal within the new tokens (which also keeps out the columns not yet
    # written), padding keys never attended.
    causal = torch.ones(t, span, dtype=torch.bool, device=ids.device).tril(diagonal=start)
    mask = causal[None, None] & key_mask[:, None, None, :span]
    # Steps of a few tokens per forward read every weight for little compute: those read the quantized copy if the model
    # keeps one. Longer forwards (prefill) are bound by the matmuls and keep the model's own weights.
    plain_possible = ids.device.type == "cpu" and not sdpa_everywhere(x.dtype, ids.device)
    bias = mask_bias(mask, x.dtype) if plain_possible else None  # once for every layer's plain attention
    fast = quant if bsz * t <= decode_weights.MAX_ROWS else None
    # The others run the model's own weights, packed once for oneDNN where that applies (the same products).
    packed = quant.packed if fast is None and quant is not None else None
    for i, (layer, (k_cache, v_cache)) in enumerate(zip(inner.layers, caches)):
        shared = prefix[i] if prefix is not None else None
        block = fast.blocks[i] if fast is not None else None
        own = packed[i] if packed is not None else None
        lean = block is not None
        normed = decode_weights.norm(layer.input_layernorm, x, lean)
        x = x + _attend(layer, normed, cos, sin, k_cache, v_cache, start, mask, shared, block, own, bias)
        x = x + decode_weights.mlp(layer, decode_weights.norm(layer.post_attention_layernorm, x, lean), block, own)
    x = decode_weights.norm(inner.norm, x[:, -1:], fast is not None)
    return decode_weights.head(model, x, quant, few_rows=fast is not None)[:, -1].float()


def _step(model, ids, positions, caches, start: int, key_mask, prefix=None, quant=None):
    """A decode step's forward: compiled (``compiled_decode.py``) for the quantized steps of a model loaded to compile
    them, ``_forward`` as it is otherwise."""
    if (quant is not None and prefix is None and ids.numel() <= decode_weights.MAX_ROWS
            and compiled_decode.wanted(model)):
        return compiled_decode.run(_forward, model, ids, positions, caches, start, key_mask, prefix, quant)
    return _forward(model, ids, positions, caches, start, key_mask, prefix, quant)


def warm_up(model, prompt: list[int], pad_id: int) -> bool:
    """Compile ``model``'s decode step now (``compiled_decode.py``), so that no request waits for it: a batch of one
    row and one of two (dynamo compiles a dimension of size one apart from the others). False where ``model`` does
    not decode compiled (``model.compile_decode`` off, no quantized decode weights, or a trained prefix)."""
    inner = decoder(model)
    prefixed = callable(getattr(model, "prefix_kv", None))  # a trained KV prefix: its steps run eager
    if prefixed or not supports(model) or not compiled_decode.wanted(inner) or decode_weights.for_model(inner) is None:
        return False
    kw = dict(max_new_tokens=3, stop_ids=[-1], pad_id=pad_id)
    generate_many(model, [prompt], batch_size=1, **kw)
    generate_many(model, [prompt, prompt], batch_size=2, **kw)
    return True


def _sample(logits, temperature: float, top_p: float, generator):
    if temperature <= 0:
        return logits.argmax(dim=-1)
    vals, idx = torch.topk(logits / temperature, min(TOP_K, logits.shape[-1]), dim=-1)
    probs = torch.softmax(vals, dim=-1)
    if top_p < 1.0:
        cum = probs.cumsum(dim=-1)
        keep = (cum - probs) < top_p  # always keeps the most likely token
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    choice = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return idx.gather(-1, choice[:, None]).squeeze(-1)


@dataclass
class _Rows:
    """The live rows of a decode: their caches share one column layout, written at ``col`` each step."""

    caches: list  # per layer (K, V), each (rows, kv_heads, capacity, head_dim)
    key_mask: torch.Tensor  # (rows, capacity): which columns each row attends
    col: int  # the next column to write
    ids: torch.Tensor  # which prompt each row answers
    next_pos: torch.Tensor  # each row's next position
    logits: torch.Tensor  # each row's logits for its next token, not yet sampled
    n_out: torch.Tensor  # tokens produced so far per row
    done: torch.Tensor  # rows that finished but are still in the batch

    def keep(self, keep: torch.Tensor) -> "_Rows":
        return _Rows([(k[keep], v[keep]) for k, v in self.caches], self.key_mask[keep], self.col, self.ids[keep],
                     self.next_pos[keep], self.logits[keep], self.n_out[keep], self.done[keep])


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of token lists right-aligned in one (rows, longest) batch: pads on the left, mask 1 on tokens."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def _zero_caches(model, rows: int, width: int, device) -> list:
    """Per layer a zeroed (K, V) pair, each (rows, kv_heads, width, head_dim). Zeros, not uninitialised memory:
    columns no row attends still meet the scores and values (left padding, a reused start shorter than another
    row's, a decode step's unwritten tail: ``attended_columns``), so they must hold numbers."""
    config = model.config
    dtype = model.model.embed_tokens.weight.dtype
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (rows, config.num_key_value_heads, width, head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in model.model.layers]


def _prefill(model, prompts: list[list[int]], ids: list[int], pad_id: int, prefix, device, shared=None,
             quant=None) -> _Rows:
    """Run a left-padded batch of prompts; the rows come back with their first logits pending.
    ``shared``: per layer (K, V) of a prompt start every prompt continues (see ``common_start``), placed before each
    row's own tokens. ``quant``: the model's quantized decode weights, read (as a decode step reads them) when the
    batch is a few tokens."""
    start = (0, None) if shared is None else (shared[0][0].shape[2], shared)
    return prefill_after_starts(model, {i: prompts[i] for i in ids}, dict.fromkeys(ids, start), pad_id, prefix,
                                device, quant)


def prefill_after_starts(model, rest: dict[int, list[int]], starts: dict[int, tuple[int, list | None]],
                         pad_id: int, prefix, device, quant=None) -> _Rows:
    """Prefill the tokens ``rest`` holds (by row id), each after its own start: ``starts[h]`` is (n, per layer the
    (K, V) of the prompt's first n tokens, each (1, kv_heads, n, head_dim), or None when n is 0). Each row's start is
    right-aligned against its own tokens, so the rows' layout is [zeros | cached start | padding | own tokens], and
    each row's positions count on from its start.
    A server's prompts start as different cached prompts did (the system prompt, a whole earlier question), and
    one forward for all of them costs a fraction of one forward per start."""
    handles = list(rest)
    tokens, mask = left_pad([rest[h] for h in handles], pad_id)
    tokens, mask = tokens.to(device), mask.bool().to(device)
    rows, width = tokens.shape
    lead = max(starts[h][0] for h in handles)
    caches = _zero_caches(model, rows, lead + width, device)
    key_mask = torch.zeros((rows, lead + width), dtype=torch.bool, device=device)
    key_mask[:, lead:] = mask
    for row, h in enumerate(handles):
        n, kv = starts[h]
        if n:
            key_mask[row, lead - n:lead] = True
            for (k, v), (sk, sv) in zip(caches, kv):
                k[row, :, lead - n:lead], v[row, :, lead - n:lead] = sk[0], sv[0]
    own_start = torch.tensor([starts[h][0] for h in handles], device=device)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0) + own_start[:, None]
    if prefix is not None:
        positions = positions + prefix[0][0].shape[2]
    logits = _forward(model, tokens, positions, caches, lead, key_mask, prefix, quant)
    zeros = torch.zeros(rows, dtype=torch.long, device=device)
    return _Rows(caches, key_mask, lead + width, torch.tensor(handles, device=device), positions[:, -1] + 1, logits,
                 zeros, zeros.bool())


def _row_kv(rows: _Rows, row: int) -> list:
    """Row ``row``'s prompt KV from a prefilled batch, per layer (1, kv_heads, tokens, head_dim): the columns its key
    mask holds (the reused start and its own tokens, not the padding between), copied out of the batch."""
    cols = rows.key_mask[row, :rows.col].nonzero().squeeze(1)
    return [(k[row:row + 1, :, cols], v[row:row + 1, :, cols]) for k, v in rows.caches]


def common_start(prompts: list[list[int]]) -> int:
    """How many leading tokens all prompts share, leaving each at least one token of its own (its last position
    gives its first logits), or 0 under ``prompt_cache.MIN_TOKENS``: a shorter start is not worth a forward of its
    own. Chat prompts share the template's opening and the system prompt."""
    first, shortest = prompts[0], min(len(p) for p in prompts)
    n = next((j for j in range(shortest - 1) if any(p[j] != first[j] for p in prompts)), shortest - 1)
    return n if len(prompts) > 1 and n >= MIN_TOKENS else 0


def _merge(a: _Rows | None, b: _Rows, room: int) -> _Rows:
    """One batch from running rows ``a`` and newly prefilled rows ``b``: both histories right-aligned to a
    common column, then ``room`` free columns for the steps to come. Columns no row of ``a`` still attends
    (finished rows' tokens, padding) are dropped first, so the layout does not grow with every admission."""
    na, nb = (0 if a is None else len(a.ids)), len(b.ids)
    used = a.key_mask[:, :a.col].any(0).nonzero().squeeze(1) if na else None
    ha, hb = (len(used) if na else 0), b.col
    width = max(ha, hb)
    caches = []
    for i, (kb, vb) in enumerate(b.caches):
        k = kb.new_zeros((na + nb, kb.shape[1], width + room, kb.shape[3]))
        v = torch.zeros_like(k)
        if na:
            ka, va = a.caches[i]
            k[:na, :, width - ha:width] = ka[:, :, used]
            v[:na, :, width - ha:width] = va[:, :, used]
        k[na:, :, width - hb:width] = kb[:, :, :hb]
        v[na:, :, width - hb:width] = vb[:, :, :hb]
        caches.append((k, v))
    mask = torch.zeros((na + nb, width + room), dtype=torch.bool, device=b.key_mask.device)
    if na:
        mask[:na, width - ha:width] = a.key_mask[:, used]
    mask[na:, width - hb:width] = b.key_mask[:, :hb]
    mask[:, width:] = True  # every row attends its own new tokens (the causal mask keeps later columns out)
    parts = [a, b] if na else [b]

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(p, name) for p in parts])

    return _Rows(caches, mask, width, cat("ids"), cat("next_pos"), cat("logits"), cat("n_out"), cat("done"))


@torch.inference_mode()
def generate_many(model, prompts: list[list[int]], *, batch_size: int, max_new_tokens: int, stop_ids: list[int],
                  pad_id: int, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, prefix=None,
                  progress=None) -> list[list[int]]:
    """New tokens for every prompt (token lists), at most ``batch_size`` decoding at once, with continuous
    batching: once a quarter of the rows have finished they leave the batch and waiting prompts take their
    places. Answers differ in length, so a fixed batch would spend most of its steps with few live rows, and
    a decode step costs nearly as much for 12 rows as for 32 (it is bound by reading the weights).

    Each returned list ends with the stop token when one was produced. Prompts are admitted shortest first.
    ``prefix``: a shared prompt start already run through the model, as per-layer (K, V) tensors of shape
    (1, kv_heads, P, head_dim) (a ``DynamicCache``'s layers); every prompt continues it, from position P.
    ``progress``: optional callable(n) told each time n prompts finish. A trained KV prefix memory brings its own
    ``prefix``."""
    prefix = prefix if prefix is not None else trained_prefix(model)
    model = decoder(model)
    quant = decode_weights.for_model(model)
    device = model.model.embed_tokens.weight.device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None and temperature > 0 else None
    stop = torch.tensor(stop_ids, device=device)
    out = torch.full((len(prompts), max_new_tokens), pad_id, dtype=torch.long, device=device)
    queue = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    rows: _Rows | None = None
    # The prompts' common start (the chat template's opening and system prompt) is run once, not once per row.
    shared, common = None, (common_start(prompts) if prefix is None else 0)
    if common:
        shared = _prefill(model, [prompts[0][:common]], [0], pad_id, None, device, quant=quant).caches
        prompts = [p[common:] for p in prompts]
    while True:
        live = 0 if rows is None else len(rows.ids)
        if queue and live * 4 <= batch_size * 3:
            admit, queue = queue[:batch_size - live], queue[batch_size - live:]
            rows = _merge(rows, _prefill(model, prompts, admit, pad_id, prefix, device, shared, quant),
                          max_new_tokens)
        if rows is None or len(rows.ids) == 0:
            break
        tok = _sample(rows.logits, temperature, top_p, gen)
        active = ~rows.done
        out[rows.ids[active], rows.n_out[active]] = tok[active]
        rows.n_out += active.long()
        finished = active & (torch.isin(tok, stop) | (rows.n_out >= max_new_tokens))
        rows.done |= finished
        if progress is not None and bool(finished.any()):
            progress(int(finished.sum()))
        if int(rows.done.sum()) * 4 >= len(rows.ids):
            # Compact: drop finished rows from the batch and every cache (one copy, then cheaper steps).
            tok = tok[~rows.done]
            rows = rows.keep(~rows.done)
            if len(rows.ids) == 0:
                continue
        tok = torch.where(rows.done, torch.full_like(tok, pad_id), tok)
        rows.logits = _step(model, tok[:, None], rows.next_pos[:, None], rows.caches, rows.col, rows.key_mask,
                            prefix, quant)
        rows.next_pos = rows.next_pos + 1
        rows.col += 1
    return [seq[:stop_index(seq, stop_ids) + 1] for seq in out.tolist()]  # through the stop token, if any

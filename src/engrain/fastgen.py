"""A lean decode loop for Llama-family models: static KV cache, cheap sampling, finished rows dropped.

Plain ``model.generate()`` spends most of a small model's step outside the matrix products: it grows
the KV cache by concatenation (copying the whole cache every step), sorts the full vocabulary for
top-p, rebuilds masks and runs generic processors, and keeps computing rows that already finished.
This loop runs the same modules of the same model (so weights, adapters merged into them, norms and
rotary embeddings are the model's own) with:

  - one preallocated K/V buffer per layer, written in place;
  - sampling as top-k (50, like ``generate``'s default) then top-p inside those k;
  - rows that hit a stop token removed from the batch once a quarter of it has finished.

Greedy decoding gives the same tokens as ``generate()`` (tested on a tiny Llama). ``supports()`` says
when it applies; ``models.generate`` falls back to ``generate()`` otherwise (other architectures, stop
strings, repetition penalty) and when ``ENGRAIN_FASTGEN=0``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

SUPPORTED_TYPES = {"llama"}
TOP_K = 50


def decoder(model):
    """The Llama model to run: ``model`` itself, or the model inside a PEFT LoRA wrapper. PEFT puts its LoRA
    layers in place of the wrapped model's linear layers, so running that model's modules applies the active
    adapter (and honours ``disable_adapter()``), exactly as the wrapper's own forward does."""
    active = getattr(model, "active_adapter", None)
    adapter = (getattr(model, "peft_config", None) or {}).get(active) if isinstance(active, str) else None
    return model.get_base_model() if getattr(adapter, "peft_type", None) == "LORA" else model  # PeftType is a str


def supports(model, *, stop: list[str] | None = None, repetition_penalty: float = 1.0) -> bool:
    if os.environ.get("ENGRAIN_FASTGEN", "1") == "0" or stop or repetition_penalty != 1.0:
        return False
    model = decoder(model)
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in SUPPORTED_TYPES or type(model).__name__ != "LlamaForCausalLM":
        return False  # a PEFT wrapper or a different architecture: leave it to generate()
    inner = getattr(model, "model", None)
    return hasattr(inner, "layers") and hasattr(inner, "rotary_emb") and hasattr(inner, "embed_tokens")


def _attend(layer, x, cos, sin, k_cache, v_cache, start: int, attn_mask, prefix=None):
    """One attention block; writes this step's K/V at [start, start + T) of the layer's buffers.
    ``prefix``: this layer's shared (K, V), each (1, kv_heads, P, head_dim), attended by every row."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    bsz, t, _ = x.shape
    hd = attn.head_dim
    q = attn.q_proj(x).view(bsz, t, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(bsz, t, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(bsz, t, -1, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k_cache[:, :, start:start + t] = k
    v_cache[:, :, start:start + t] = v
    keys, values = k_cache[:, :, :start + t], v_cache[:, :, :start + t]
    if prefix is None:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, scale=attn.scaling,
                                             enable_gqa=keys.shape[1] != q.shape[1])
    else:
        out = _attend_with_prefix(q, keys, values, prefix, attn_mask, attn.scaling)
    return attn.o_proj(out.transpose(1, 2).reshape(bsz, t, -1))


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


def _forward(model, ids, positions, caches, start: int, key_mask, prefix=None):
    """Run the decoder on ``ids`` (B, T) at cache offset ``start``; returns last-position logits (B, V).
    ``prefix``: per layer, a shared (K, V) every row attends before its own keys (or None)."""
    inner = model.model
    x = inner.embed_tokens(ids)
    cos, sin = inner.rotary_emb(x, positions)
    bsz, t = ids.shape
    total = start + t
    # Boolean mask (B, 1, T, total): causal within the new tokens, padding keys never attended.
    causal = torch.ones(t, total, dtype=torch.bool, device=ids.device).tril(diagonal=start)
    mask = causal[None, None] & key_mask[:, None, None, :total]
    for i, (layer, (k_cache, v_cache)) in enumerate(zip(inner.layers, caches)):
        shared = prefix[i] if prefix is not None else None
        x = x + _attend(layer, layer.input_layernorm(x), cos, sin, k_cache, v_cache, start, mask, shared)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    x = inner.norm(x[:, -1:])
    return model.lm_head(x)[:, -1].float()


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


@torch.inference_mode()
def generate_batch(model, input_ids, attention_mask, *, max_new_tokens: int, stop_ids: list[int], pad_id: int,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, prefix=None):
    """New tokens for a left-padded batch, as a (B, max_new_tokens) tensor padded with ``pad_id`` after a
    row's stop token (the shape ``generate()`` returns once the prompt columns are cut off).

    ``prefix``: a shared prompt start already run through the model, as per-layer (K, V) tensors of shape
    (1, kv_heads, P, head_dim) (a ``DynamicCache``'s layers). Every row continues it: ``input_ids`` are
    then the rows' own tokens, left-padded, and their positions start at P."""
    model = decoder(model)
    device = input_ids.device
    bsz, width = input_ids.shape
    config = model.config
    dtype = model.model.embed_tokens.weight.dtype
    n_kv = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    total = width + max_new_tokens
    caches = [(torch.empty(bsz, n_kv, total, head_dim, dtype=dtype, device=device),
               torch.empty(bsz, n_kv, total, head_dim, dtype=dtype, device=device)) for _ in model.model.layers]
    key_mask = torch.zeros(bsz, total, dtype=torch.bool, device=device)
    key_mask[:, :width] = attention_mask.bool()
    key_mask[:, width:] = True
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if prefix is not None:
        positions = positions + prefix[0][0].shape[2]
    gen = None
    if seed is not None and temperature > 0:
        gen = torch.Generator(device=device).manual_seed(seed)
    stop = torch.tensor(stop_ids, device=device)

    out = torch.full((bsz, max_new_tokens), pad_id, dtype=torch.long, device=device)
    rows = torch.arange(bsz, device=device)  # which original row each live row is
    logits = _forward(model, input_ids, positions, caches, 0, key_mask, prefix)
    next_pos = positions[:, -1] + 1
    live_done = torch.zeros(bsz, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        tok = _sample(logits, temperature, top_p, gen)
        tok = torch.where(live_done, torch.full_like(tok, pad_id), tok)
        out[rows, step] = tok
        live_done = live_done | torch.isin(tok, stop)
        if step == max_new_tokens - 1:
            break
        n_done = int(live_done.sum())
        if n_done == len(rows):
            break
        if n_done and n_done * 4 >= len(rows):
            # Compact: drop finished rows from the batch and from every cache (one copy, then cheaper steps).
            keep = (~live_done).nonzero().squeeze(-1)
            rows, tok, next_pos = rows[keep], tok[keep], next_pos[keep]
            key_mask = key_mask[keep]
            caches = [(k[keep], v[keep]) for k, v in caches]
            live_done = live_done[keep]
        logits = _forward(model, tok[:, None], next_pos[:, None], caches, width + step, key_mask, prefix)
        next_pos = next_pos + 1
    return out

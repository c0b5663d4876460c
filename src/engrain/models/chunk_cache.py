"""Retrieved chunks' KV, reused wherever a chunk comes back in a rag prompt (``engrain serve --reuse-chunks``).

The prompt cache (``prompt_cache.py``) reuses a prompt's start, exactly. A rag prompt's chunks come back in other
orders and after other chunks, so past its first chunk a new question reuses nothing. Here each chunk's KV is
computed once, after the prompt's head alone (the template's opening, the system prompt, the instruction), and
placed wherever the chunk appears: its keys rotated by the move, since rotary position embeddings compose (rotating
a key by position p and then by d is rotating it by p + d).

It is approximate, and that is the trade: a chunk's tokens do not attend to the chunks placed before it
(position-independent caching, as in EPIC, or CacheBlend without its partial recompute). The question and the
answer attend to every chunk as before. What it costs in answers is measured by
``experiments/answering/reuse_chunks.py`` (rag with and without it, paired); what it saves by
``python bench/bench_answer_speed.py``. Each chunk's KV depends only on the head and the chunk, not on what was asked
before; in bf16 its rounding still depends on which chunks were computed in the same forward.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .decode_weights import rope
from .prompt_cache import Layers, _bytes

MAX_BYTES = 256 * 2**20  # per served model: a few hundred chunks of a small model (a judgement, as the prompt cache's)


def chunk_segments(offsets: list[tuple[int, int]], prompt: str, pieces: list[str]) -> list[tuple[int, int]]:
    """Token ranges of the ``pieces`` (each chunk as the prompt shows it, in order) in a prompt tokenized with
    ``offsets`` (each token's character span). The ranges are contiguous: a chunk's range runs to where the next
    chunk starts, so the separator between them belongs to the first. [] when a piece is not in the prompt or a
    token straddles a piece's edge (its tokens would then depend on what surrounds it)."""
    starts_at = {start: i for i, (start, end) in enumerate(offsets) if end > start}
    ends_at = {end: i for i, (start, end) in enumerate(offsets) if end > start}
    bounds, at = [], 0
    for piece in pieces:
        begin = prompt.find(piece, at)
        if begin < 0 or begin not in starts_at:
            return []
        bounds.append(starts_at[begin])
        at = begin + len(piece)
    if not pieces or at not in ends_at:
        return []
    bounds.append(ends_at[at] + 1)
    return list(zip(bounds[:-1], bounds[1:]))


def rotate_keys(model, layers: Layers, delta: int) -> Layers:
    """``layers`` with every key's rotary position moved on by ``delta`` (values do not carry a position)."""
    if delta == 0:
        return layers
    k0 = layers[0][0]
    inner = model.model
    cos, sin = inner.rotary_emb(k0.float(), torch.tensor([[delta]], device=k0.device))
    cos, sin = cos[:, None], sin[:, None]  # (1, 1, 1, head_dim): one move for every head and token
    return [(rope(k.float(), cos, sin).to(k.dtype), v) for k, v in layers]


def assemble(model, prompt: list[int], segments: list[tuple[int, int]], head_kv: Layers,
             chunks: dict[tuple, tuple[int, Layers]]) -> tuple[int, Layers]:
    """The KV of ``prompt``'s head and chunks (its first ``segments[-1][1]`` tokens): the head's (``head_kv``), then
    each chunk's (``chunks``: (head tokens, chunk tokens) -> (its first position, its KV)) moved to where this
    prompt has it."""
    head = tuple(prompt[:segments[0][0]])
    parts = [head_kv]
    for a, b in segments:
        base, layers = chunks[(head, tuple(prompt[a:b]))]
        parts.append(rotate_keys(model, layers, a - base))
    joined = [(torch.cat([p[i][0] for p in parts], dim=2), torch.cat([p[i][1] for p in parts], dim=2))
              for i in range(len(head_kv))]
    return segments[-1][1], joined


class ChunkCache:
    """(prompt head, chunk tokens) -> (the chunk's first position, its per-layer KV computed after the head alone),
    plus each head's own KV; at most ``max_bytes`` of chunks' tensors, the least recently used dropped first."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, tuple[int, Layers]] = OrderedDict()
        self.heads: dict[tuple[int, ...], Layers] = {}  # a few per served model (one per system prompt)
        self.bytes = 0
        self.stats = {"chunks": 0, "chunk_hits": 0, "tokens_reused": 0}

    def get(self, key: tuple) -> tuple[int, Layers] | None:
        """The cached chunk of ``key`` ((head tokens, chunk tokens)), or None."""
        self.stats["chunks"] += 1
        if key not in self.entries or key[0] not in self.heads:
            return None
        self.entries.move_to_end(key)
        self.stats["chunk_hits"] += 1
        self.stats["tokens_reused"] += len(key[1])
        return self.entries[key]

    def add(self, head: list[int], chunk: list[int], layers: Layers) -> tuple[int, Layers]:
        """Keep the KV of ``head + chunk`` computed as one prompt: the head's part once per head, the chunk's part
        keyed by both (a chunk's KV depends on the head it was read after). Returns the chunk's entry."""
        n = len(head)
        key = (tuple(head), tuple(chunk))
        if key[0] not in self.heads:
            self.heads[key[0]] = [(k[:, :, :n].clone(), v[:, :, :n].clone()) for k, v in layers]
        entry = (n, [(k[:, :, n:].clone(), v[:, :, n:].clone()) for k, v in layers])
        if key not in self.entries:
            self.entries[key] = entry
            self.bytes += _bytes(entry[1])
        while self.bytes > self.max_bytes and self.entries:
            self.bytes -= _bytes(self.entries.popitem(last=False)[1][1])
        return entry

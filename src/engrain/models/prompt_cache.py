"""The KV of recent prompts, kept so that a prompt which starts the way an earlier one did prefills only the rest.

Every chat prompt starts with the template's opening and the system prompt; a conversation's next turn starts with
the whole conversation so far; a rag prompt starts with its retrieved chunks, and the same chunks come back for
the same or a neighbouring question. vLLM calls this automatic prefix caching; here it is one cache per served
model, its least recently used prompts dropped first.

It is exact: attention is causal, so the keys and values of a prompt's first n tokens do not depend on the tokens
after them, and any cached prompt's first n columns serve every prompt that shares its first n tokens. (A short
remainder is run as a decode step is, from the int8 decode weights where the model keeps them, so its logits
round as a decode step's do.)
"""

from __future__ import annotations

from collections import OrderedDict

MIN_TOKENS = 8  # a shorter shared start is not worth a lookup and a copy (a judgement, not tuned)
MAX_BYTES = 256 * 2**20  # per served model: some thousands of prompt tokens of a small model (a judgement)

Layers = list  # per layer a (K, V) pair of tensors, each (1, kv_heads, tokens, head_dim)


def _shared(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class PromptCache:
    """Prompts (token tuples) -> their per-layer KV, at most ``max_bytes`` of tensors."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], Layers] = OrderedDict()
        self.bytes = 0
        self.stats = {"lookups": 0, "hits": 0, "tokens_reused": 0}

    def match(self, prompt: list[int]) -> tuple[int, Layers | None]:
        """(n, the KV of ``prompt``'s first n tokens) for the longest start a cached prompt shares with it, always
        leaving ``prompt`` at least one token to run (its last position gives the first logits); (0, None) when
        nothing of at least ``MIN_TOKENS`` is shared."""
        self.stats["lookups"] += 1
        head = prompt[:-1]
        best, key = 0, None
        for cached in self.entries:
            n = _shared(cached, head)
            if n > best:
                best, key = n, cached
        if best < MIN_TOKENS:
            return 0, None
        self.entries.move_to_end(key)
        self.stats["hits"] += 1
        self.stats["tokens_reused"] += best
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in self.entries[key]]

    def add(self, prompt: list[int], layers: Layers) -> None:
        """Keep ``prompt``'s KV; ``layers`` are kept as they are, so they must be tensors nothing writes again."""
        key = tuple(prompt)
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        size = _bytes(layers)
        if len(key) < MIN_TOKENS or size > self.max_bytes:
            return
        self.entries[key] = layers
        self.bytes += size
        while self.bytes > self.max_bytes:
            self.bytes -= _bytes(self.entries.popitem(last=False)[1])


def _bytes(layers: Layers) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)

"""Near-duplicate removal with MinHash over word shingles, bucketed by LSH bands.

A weak generator sampled several times on one chunk often writes the same sentence twice with a word
changed; chunk overlaps make deterministic items repeat too. Training on duplicates only overweights them.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .text import normalize

_PRIME = (1 << 61) - 1


class NearDuplicateIndex:
    """``add(text)`` returns False when ``text`` is a near duplicate (estimated Jaccard >= threshold) of one added."""

    def __init__(self, threshold: float = 0.8, shingle: int = 3, num_perm: int = 64, bands: int = 16,
                 seed: int = 1) -> None:
        self.threshold, self.shingle, self.bands = threshold, shingle, bands
        self.rows = num_perm // bands
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, _PRIME, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, _PRIME, size=num_perm, dtype=np.uint64)
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self.signatures: list[np.ndarray] = []
        self.exact: set[str] = set()

    def _shingles(self, norm: str) -> list[int]:
        toks = norm.split()
        n = min(self.shingle, max(1, len(toks)))
        grams = {" ".join(toks[i:i + n]) for i in range(len(toks) - n + 1)} or {norm}
        return [int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") >> 3 for g in grams]

    def signature(self, text: str) -> np.ndarray:
        hashes = np.array(self._shingles(normalize(text)), dtype=np.uint64)
        # (a*x + b) mod p in uint64 wraps; the wrap is a fine hash too, it only needs to be a fixed permutation-ish map.
        perm = (hashes[:, None] * self.a[None, :] + self.b[None, :]) % np.uint64(_PRIME)
        return perm.min(axis=0)

    def add_exact(self, text: str) -> bool:
        """Only exact (normalized) repeats count as duplicates; the text still joins the near-duplicate index."""
        norm = normalize(text)
        if not norm or norm in self.exact:
            return False
        self.add(text)
        self.exact.add(norm)
        return True

    def add(self, text: str) -> bool:
        norm = normalize(text)
        if not norm or norm in self.exact:
            return False
        sig = self.signature(text)
        keys = [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
        candidates = {j for band, key in zip(self.buckets, keys) for j in band.get(key, ())}
        for j in candidates:
            if float(np.mean(self.signatures[j] == sig)) >= self.threshold:
                return False
        idx = len(self.signatures)
        self.signatures.append(sig)
        self.exact.add(norm)
        for band, key in zip(self.buckets, keys):
            band.setdefault(key, []).append(idx)
        return True

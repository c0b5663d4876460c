"""Token-aware chunking that respects the document's structure.

A document is cut first at its headings (a chunk never spans two sections), then packed greedily from
sentences up to ``chunk_tokens`` tokens of the model's own tokenizer, preferring to end a chunk at a paragraph
break. Consecutive chunks of a section share up to ``overlap`` tokens of whole sentences. A sentence longer
than a chunk is cut at token boundaries.

Token counts come from one tokenization of the whole document (offsets mapping), so counting any span is a
binary search, and many documents are tokenized in one batch by the fast (Rust) tokenizer.

Chunk ids are ``<doc id>#<first 10 hex of the chunk text's sha256>``: the same text in the same document gets
the same id on every run, and an edit elsewhere in the document does not rename chunks it did not change.
"""

from __future__ import annotations

import hashlib
import re
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

from .schema import Chunk

# A sentence ends at . ! ? (plus closing quotes/brackets) followed by whitespace; a line break inside a
# paragraph (list items, table rows, verse) also ends one.
_SENTENCE_END = re.compile(r"(?<=[.!?…。！？])[\"'”’)\]]*\s+|\n")
_PARAGRAPH = re.compile(r"\n\s*\n")


def load_tokenizer(spec: str | None = None):
    """The tokenizer of the model that will use the chunks (the embedded default when ``spec`` is None).

    When the model folder has a ``tokenizer.json`` we load it with the ``tokenizers`` library alone: the same
    token boundaries without importing transformers and torch, which costs seconds on every ingest run.
    """
    from pathlib import Path

    from ..models import load_tokenizer as load, resolve_model

    _, path = resolve_model(spec)
    file = Path(path) / "tokenizer.json"
    if file.is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(file))
    return load(spec)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def token_starts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """For each text, the character offset where each of its tokens starts (one batched call)."""
    backend = tokenizer if hasattr(tokenizer, "encode_batch") else getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: no length warnings, no Python per-token work
        return [[s for s, _ in enc.offsets] for enc in backend.encode_batch(list(texts), add_special_tokens=False)]
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    return [[s for s, _ in offs] for offs in enc["offset_mapping"]]


@dataclass
class _Unit:
    start: int
    end: int
    paragraph_start: bool


class _Counter:
    """Tokens whose first character lies in [a, b): exact in-context counts by binary search."""

    def __init__(self, starts: list[int]):
        self.starts = starts

    def __call__(self, a: int, b: int) -> int:
        return bisect_left(self.starts, b) - bisect_left(self.starts, a)

    def cut_points(self, a: int, b: int, size: int) -> list[int]:
        """Character offsets splitting [a, b) into near-equal pieces of at most ``size`` tokens."""
        first, last = bisect_left(self.starts, a), bisect_left(self.starts, b)
        pieces = -(-(last - first) // size)
        step = -(-(last - first) // pieces)  # equal pieces: no one-token tail chunk
        return [self.starts[i] for i in range(first + step, last, step)]


def _stripped(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def _sections(text: str, headings: list[list]) -> list[tuple[int, int, list[str]]]:
    """(start, end, heading path) per section; a heading with no body of its own joins the next section."""
    bounds = [(0, [])]
    stack: list[tuple[int, str]] = []
    for start, level, title in headings:
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title))
        path = [t for _, t in stack]
        if start == 0:
            bounds[0] = (0, path)
        else:
            bounds.append((start, path))
    heading_ends = {start: start + len(text[start:].split("\n", 1)[0]) for start, _, _ in headings}
    sections = []
    pending = None  # start of a heading-only section waiting to be merged
    for i, (start, path) in enumerate(bounds):
        end = bounds[i + 1][0] if i + 1 < len(bounds) else len(text)
        a, b = _stripped(text, start, end)
        if a >= b:
            continue
        if i + 1 < len(bounds) and start in heading_ends and _stripped(text, heading_ends[start], end)[0] >= b:
            pending = a if pending is None else pending
            continue
        sections.append((pending if pending is not None else a, b, path))
        pending = None
    if pending is not None:
        sections.append((pending, _stripped(text, pending, len(text))[1], bounds[-1][1]))
    return sections


def _units(text: str, a: int, b: int, count: _Counter, max_tokens: int) -> list[_Unit]:
    units: list[_Unit] = []
    pos = a
    for para in [*_PARAGRAPH.finditer(text, a, b), None]:
        p_end = para.start() if para else b
        first = True
        s = pos
        for m in [*_SENTENCE_END.finditer(text, pos, p_end), None]:
            e = m.start() if m else p_end
            u0, u1 = _stripped(text, s, e)
            if u0 < u1:
                if count(u0, u1) > max_tokens:  # one very long sentence: cut at token boundaries
                    points = [u0, *count.cut_points(u0, u1, max_tokens), u1]
                    for x, y in zip(points, points[1:]):
                        x, y = _stripped(text, x, y)
                        if x < y:
                            units.append(_Unit(x, y, first))
                            first = False
                else:
                    units.append(_Unit(u0, u1, first))
                    first = False
            s = m.end() if m else p_end
        pos = para.end() if para else b
    return units


def chunk_text(doc_id: str, text: str, headings: list[list], starts: list[int], chunk_tokens: int,
               overlap: int) -> list[Chunk]:
    """Chunks of one document; ``starts`` are its token start offsets (``token_starts``); sizes as
    ``IngestConfig.chunk_tokens`` and ``chunk_overlap``."""
    if chunk_tokens < 8:
        raise ValueError("chunk_tokens must be at least 8")
    overlap = max(0, min(overlap, chunk_tokens // 2))
    count = _Counter(starts)
    chunks: list[Chunk] = []
    seen: dict[str, int] = {}
    for a, b, path in _sections(text, headings):
        units = _units(text, a, b, count, chunk_tokens)
        i = 0
        while i < len(units):
            j = i + 1
            while j < len(units) and count(units[i].start, units[j].end) <= chunk_tokens:
                j += 1
            cut = j
            if j < len(units):  # prefer ending at a paragraph break when that keeps the chunk at least half full
                for k in range(j - 1, i, -1):
                    if units[k].paragraph_start:
                        if count(units[i].start, units[k - 1].end) >= chunk_tokens // 2:
                            cut = k
                        break
            start, end = units[i].start, units[cut - 1].end
            body = text[start:end]
            digest = sha256(body)
            cid = f"{doc_id}#{digest[:10]}"
            seen[cid] = seen.get(cid, 0) + 1
            if seen[cid] > 1:  # the same text twice in one document
                cid = f"{cid}-{seen[cid]}"
            chunks.append(Chunk(id=cid, doc_id=doc_id, text=body, start=start, end=end, heading_path=list(path),
                                tokens=count(start, end), sha256=digest, index=len(chunks)))
            if cut >= len(units):
                break
            nxt = cut
            if overlap:  # restart at the earliest sentence whose tail fits the overlap and the next chunk
                for k in range(i + 1, cut):
                    if (count(units[k].start, units[cut - 1].end) <= overlap
                            and count(units[k].start, units[cut].end) <= chunk_tokens):
                        nxt = k
                        break
            i = nxt
    return chunks

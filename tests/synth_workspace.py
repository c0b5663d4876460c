"""Build a workspace's corpus files by hand (the documented chunks.jsonl / documents.jsonl records), so synthesis
tests do not depend on ingestion. The documents are invented for these tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

DOCS = {
    "orvik-observatory": (
        "Orvik Observatory",
        "The Orvik Observatory is a research station on Mount Tessel. It was founded by Ilse Marren in 1962. "
        "The observatory houses the Kell Telescope, which has a mirror of 4 metres. "
        "Ilse Marren was the first director of the Orvik Observatory. "
        "In 1988 the observatory discovered the comet Brannock. About 40 astronomers work there today.",
    ),
    "kell-telescope": (
        "Kell Telescope",
        "The Kell Telescope was built by the Dunmore Works in 1960. Its mirror was ground in the town of Varra. "
        "The Kell Telescope is the largest instrument of the Orvik Observatory. "
        "Engineers from Varra serviced the telescope until 1995.",
    ),
    "dunmore-works": (
        "Dunmore Works",
        "The Dunmore Works is a glass company based in Varra. It was founded by Tobias Lenn in 1921. "
        "The company made lenses for lighthouses before it made mirrors. Tobias Lenn was the brother of Ada Lenn.",
    ),
}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_corpus(ws_root: Path, docs: dict[str, tuple[str, str]] | None = None, sentences_per_chunk: int = 2) -> Path:
    """Write documents.jsonl and chunks.jsonl under ``ws_root/corpus``; returns ws_root."""
    from engrain.synth.text import split_sentences

    docs = DOCS if docs is None else docs
    corpus = Path(ws_root) / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    doc_rows, chunk_rows = [], []
    for doc_id, (title, text) in docs.items():
        doc_rows.append({"id": doc_id, "path": f"{doc_id}.txt", "format": "txt", "title": title, "text": text,
                         "sha256": sha(text), "bytes": len(text), "tokens": len(text) // 4, "status": "ok"})
        sents = split_sentences(text)
        pos = 0
        for i in range(0, len(sents), sentences_per_chunk):
            chunk = " ".join(sents[i:i + sentences_per_chunk])
            start = text.find(sents[i], pos)
            chunk_rows.append({"id": f"{doc_id}#{i // sentences_per_chunk}", "doc_id": doc_id, "text": chunk,
                               "start": start, "end": start + len(chunk), "heading_path": [title],
                               "tokens": len(chunk) // 4, "sha256": sha(chunk)})
            pos = max(pos, start)
    (corpus / "documents.jsonl").write_text("".join(json.dumps(r) + "\n" for r in doc_rows))
    (corpus / "chunks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chunk_rows))
    return Path(ws_root)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

"""The corpus files (WORKSPACE/corpus/*.jsonl) as typed records, and readers for later stages.

documents.jsonl, one line per document:
    {"id", "path", "format", "title", "text", "sha256", "bytes", "tokens", "status": "ok"|"removed", ...}
    ``id`` is the path relative to the ingested folder without its extension ("handbook/leave-policy"),
    so a top-level file's id is its file name without extension, as benchmark ``docs`` fields expect.
chunks.jsonl, one line per chunk of a document whose status is "ok":
    {"id", "doc_id", "text", "start", "end", "heading_path", "tokens", "sha256"}
    ``start``/``end`` are character offsets into the document's ``text``; ``sha256`` hashes the chunk text,
    so later stages can tell new or changed chunks from ones they already processed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import EngrainError
from ..workspace import Workspace


@dataclass
class Document:
    id: str
    path: str
    format: str
    text: str
    sha256: str
    title: str = ""
    bytes: int = 0
    tokens: int = 0
    status: str = "ok"
    meta: dict = field(default_factory=dict)
    change: str = ""
    headings: list = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Chunk:
    id: str
    doc_id: str
    text: str
    start: int
    end: int
    heading_path: list[str] = field(default_factory=list)
    tokens: int = 0
    sha256: str = ""
    index: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _read_jsonl(path: Path, cls):
    if not path.exists():
        raise EngrainError(f"{path} does not exist.", hint="Run `engrain ingest DOCS_DIR -w WORKSPACE` first.")
    rows = []
    names = set(cls.__dataclass_fields__)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                rows.append(cls(**{k: v for k, v in data.items() if k in names}))
            except (ValueError, TypeError) as exc:
                raise EngrainError(f"{path}:{lineno}: not a valid {cls.__name__} record ({exc}).",
                                   hint="Re-run `engrain ingest` to rewrite the corpus.") from exc
    return rows


def read_documents(workspace: Workspace, include_removed: bool = False) -> list[Document]:
    docs = _read_jsonl(workspace.documents_path, Document)
    return docs if include_removed else [d for d in docs if d.status == "ok"]


def read_chunks(workspace: Workspace) -> list[Chunk]:
    return _read_jsonl(workspace.chunks_path, Chunk)

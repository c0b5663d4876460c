"""The corpus files (WORKSPACE/corpus/*.jsonl) as typed records, and readers for later stages.

documents.jsonl, one line per document:
    {"id", "path", "format", "title", "text", "sha256", "bytes", "tokens", "status": "ok"|"removed", "meta",
     "change", "headings", "aliases", "error"}
    ``id`` is the path relative to the ingested folder without its extension ("handbook/leave-policy"),
    so a top-level file's id is its file name without extension, as benchmark ``docs`` fields expect.
    (Records of a .jsonl/.json export get "<path without extension>/<record id>"; when two files differ only
    by extension, the second keeps its extension in the id.)
    ``sha256`` hashes the document ``text``; ``meta.file_sha256`` hashes the file's bytes. ``headings`` lists
    ``[start, level, title]`` of each heading in ``text``. Documents with identical text are stored once:
    ``path`` is the copy kept, ``aliases`` the other paths. ``meta`` holds what the parser found (``encoding``,
    ``pages``, ``pages_without_text``...).
chunks.jsonl, one line per chunk of a document whose status is "ok":
    {"id", "doc_id", "text", "start", "end", "heading_path", "tokens", "sha256", "index"}
    ``start``/``end`` are character offsets into the document's ``text`` (``text[start:end] == chunk text``);
    ``sha256`` hashes the chunk text, so later stages can tell new or changed chunks from ones they already
    processed. ``id`` is "<doc id>#<first 10 hex of sha256>" (a suffix "-2", "-3" for repeats inside one
    document): stable across runs, and an edit in one section leaves other sections' chunk ids unchanged.
    ``tokens`` counts the model tokenizer's tokens; ``index`` is the chunk's position in its document.

The incremental contract (what `engrain ingest` promises to later stages):
    - ``status`` "ok": the document is in the corpus; "removed": its file is gone (or now excluded). Removed
      records stay, with empty ``text`` and no chunks, so a stage can drop what it built from them.
    - ``change`` says what the last ingest run did: "new", "changed" (text differs), "unchanged", or
      "removed" (this run removed it; an older removal reads "unchanged").
    - A stage that may skip ingest runs should not rely on ``change`` alone: it should remember the chunk
      ``(id, sha256)`` pairs it processed and, on its next run, process the chunks whose pair it has not
      seen and drop what it built from pairs that are gone.
    - ``error`` non-empty: the file's latest version could not be read; the record is the last good version.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import EngrainError
from ..jsonl import read_jsonl
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


def _read_records(path: Path, cls):
    if not path.exists():
        raise EngrainError(f"{path} does not exist.", hint="Run `engrain ingest DOCS_DIR -w WORKSPACE` first.")
    rows = []
    names = set(cls.__dataclass_fields__)
    hint = "Re-run `engrain ingest` to rewrite the corpus."
    for lineno, data in read_jsonl(path, hint=hint):
        try:
            rows.append(cls(**{k: v for k, v in data.items() if k in names}))
        except TypeError as exc:
            raise EngrainError(f"{path}:{lineno}: not a valid {cls.__name__} record ({exc}).", hint=hint) from exc
    return rows


def read_documents(workspace: Workspace, include_removed: bool = False) -> list[Document]:
    docs = _read_records(workspace.documents_path, Document)
    return docs if include_removed else [d for d in docs if d.status == "ok"]


def read_chunks(workspace: Workspace) -> list[Chunk]:
    return _read_records(workspace.chunks_path, Chunk)

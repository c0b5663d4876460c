"""The retrieval index: every chunk of the corpus embedded and stored in LanceDB (WORKSPACE/index/), with a
full-text (BM25) index on the chunk text.

``engrain index`` is incremental: a chunk whose ``sha256`` is already in the table keeps its vector; new or
changed chunks are embedded and written; chunks gone from the corpus are deleted. So re-indexing after a
re-ingest pays only for what changed.

The index records which embedding model (name and dimension) made its vectors in ``engrain-index.json``;
searching or updating it with another model is refused, because vectors from two models are not comparable.

Vector search is exact (flat) below ``RagConfig.ann_min_rows`` rows and uses an IVF_SQ index (LanceDB) at or
above it: flat search grows with the corpus while IVF_SQ stays fast and builds far quicker than IVF_PQ or HNSW
(``python bench/bench_rag.py`` measures all three; docs/performance.md holds the numbers).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import write_json
from ..config import RagConfig
from ..errors import EngrainError
from ..progress import Progress
from ..workspace import Workspace
from .embeddings import Embedder, embedding_model_name, load_embedder

TABLE = "chunks"
META = "engrain-index.json"
INDEX_VERSION = 1


@dataclass
class Hit:
    """One retrieved chunk; ``score`` is the retriever's own (cosine similarity, BM25, or fused RRF)."""

    chunk_id: str
    doc_id: str
    text: str
    score: float


@dataclass
class IndexSummary:
    path: str
    embedding_model: str
    dim: int
    chunks: int = 0
    embedded: int = 0
    deleted: int = 0
    unchanged: int = 0
    seconds: float = 0.0
    embed_seconds: float = 0.0
    ann: bool = False
    details: dict = field(default_factory=dict)

    @property
    def chunks_per_s(self) -> float:
        return self.embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "chunks_per_s": round(self.chunks_per_s, 1)}


def rebuild_hint(ws: Workspace) -> str:
    return f"Rebuild it: engrain index -w {ws.root} --rebuild"


def read_meta(ws: Workspace) -> dict | None:
    import json

    path = ws.index_dir / META
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise EngrainError(f"{path} is unreadable ({exc}).", hint=rebuild_hint(ws)) from exc


def _check_model(ws: Workspace, meta: dict, name: str) -> None:
    if meta.get("embedding_model") != name:
        raise EngrainError(
            f"The index in {ws.index_dir} was built with the embedding model '{meta.get('embedding_model')}' "
            f"(dimension {meta.get('dim')}), but '{name}' is configured; vectors from two models cannot be compared.",
            hint=f"Search it with --embedding-model {meta.get('embedding_model')}, or rebuild it with the new model: "
                 f"engrain index -w {ws.root} --rebuild --embedding-model {name}")


def _connect(ws: Workspace):
    import lancedb

    return lancedb.connect(str(ws.index_dir))


def _open_table(ws: Workspace, db):
    try:
        if TABLE not in db.list_tables().tables:
            return None
        table = db.open_table(TABLE)
        table.count_rows()  # reads the manifest: fails here on a damaged table rather than mid-search
        return table
    except Exception as exc:  # lance raises OSError/ValueError/RuntimeError flavours for damaged files
        raise EngrainError(f"The index table in {ws.index_dir} is unreadable or corrupt ({type(exc).__name__}: "
                           f"{str(exc)[:200]}).", hint=rebuild_hint(ws)) from exc


def _quote(ids: list[str]) -> str:
    return ", ".join("'" + i.replace("'", "''") + "'" for i in ids)


def _existing(ws: Workspace, table) -> dict[str, str]:
    """chunk id -> sha256 of what the table holds now."""
    try:
        n = table.count_rows()
        if n == 0:
            return {}
        rows = table.search().select(["id", "sha256"]).limit(n).to_arrow()
    except Exception as exc:
        raise EngrainError(f"The index table in {ws.index_dir} is unreadable or corrupt ({exc}).",
                           hint=rebuild_hint(ws)) from exc
    return dict(zip(rows.column("id").to_pylist(), rows.column("sha256").to_pylist()))


def _arrow_rows(chunks, vectors: np.ndarray, dim: int):
    import pyarrow as pa

    return pa.table({
        "id": [c.id for c in chunks],
        "doc_id": [c.doc_id for c in chunks],
        "text": [c.text for c in chunks],
        "sha256": [c.sha256 for c in chunks],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).ravel()), dim),
    })


def write_index(ws: Workspace, chunks: list, embedder: Embedder, config: RagConfig | None = None, *,
                rebuild: bool = False, progress: bool = False, vectors: np.ndarray | None = None) -> IndexSummary:
    """Bring the index in line with ``chunks`` (objects with id, doc_id, text, sha256).

    ``vectors`` may hold precomputed embeddings aligned with ``chunks`` (benchmarks reuse them across scales).
    """
    from lancedb.index import FTS, IvfSq

    config = config or RagConfig()
    t0 = time.perf_counter()
    if not chunks:
        raise EngrainError(f"{ws.chunks_path} holds no chunks, so there is nothing to index.",
                           hint="Ingest documents first: engrain ingest DOCS_DIR -w WORKSPACE")
    ids = [c.id for c in chunks]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise EngrainError(f"{ws.chunks_path}: chunk id '{dup}' appears more than once.",
                           hint="Re-run `engrain ingest` to rewrite the corpus.")
    if rebuild and ws.index_dir.exists():
        shutil.rmtree(ws.index_dir)
    ws.index_dir.mkdir(parents=True, exist_ok=True)
    meta = read_meta(ws)
    db = _connect(ws)
    table = _open_table(ws, db)
    if meta is not None and table is not None:
        _check_model(ws, meta, embedder.name)
    if meta is None or table is None:
        # Record the model before any vector is written, so a crash never leaves vectors of unknown origin.
        if table is not None:
            db.drop_table(TABLE)
            table = None
        meta = {"version": INDEX_VERSION, "embedding_model": embedder.name, "dim": embedder.dim}
        write_json(ws.index_dir / META, meta)

    summary = IndexSummary(path=str(ws.index_dir), embedding_model=embedder.name, dim=embedder.dim)
    have = _existing(ws, table) if table is not None else {}
    wanted = {c.id: c for c in chunks}
    todo = [c for c in chunks if have.get(c.id) != c.sha256]
    gone = [i for i in have if i not in wanted]
    stale = [c.id for c in todo if c.id in have]  # changed text: old row out, new row in
    summary.unchanged = len(chunks) - len(todo)

    for start in range(0, len(gone) + len(stale), 500):
        batch = (gone + stale)[start:start + 500]
        table.delete(f"id IN ({_quote(batch)})")
    summary.deleted = len(gone)

    if todo:
        te = time.perf_counter()
        if vectors is not None:
            pos = {c.id: i for i, c in enumerate(chunks)}
            vecs = vectors[[pos[c.id] for c in todo]]
        else:
            with Progress(progress, len(todo), 0, "embedding chunks") as bar:
                vecs = embedder.encode([c.text for c in todo], progress=bar.advance)
        summary.embed_seconds = time.perf_counter() - te
        summary.embedded = len(todo)
        rows = _arrow_rows(todo, vecs, embedder.dim)
        if table is None:
            table = db.create_table(TABLE, rows)
        else:
            table.add(rows)

    changed = bool(todo or gone)
    n = table.count_rows()
    if changed or rebuild:
        table.create_index("text", config=FTS(), replace=True)
        if n >= config.ann_min_rows:
            table.create_index("vector", config=IvfSq(distance_type="cosine"), replace=True)
        else:
            for idx in table.list_indices():
                if idx.name.startswith("vector"):
                    table.drop_index(idx.name)
    summary.ann = any(i.name.startswith("vector") for i in table.list_indices())
    summary.chunks = n
    meta.update(chunks=n, ann=summary.ann, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_json(ws.index_dir / META, meta)
    summary.seconds = time.perf_counter() - t0
    return summary


def build_index(ws: Workspace, config: RagConfig | None = None, *, rebuild: bool = False,
                progress: bool = False) -> IndexSummary:
    """``engrain index``: embed the workspace's chunks into WS/index/ (incremental; see module docstring)."""
    from ..corpus.schema import read_chunks

    config = config or RagConfig()
    if not rebuild:  # refuse before paying for loading a model; a rebuild starts from nothing anyway
        meta = read_meta(ws)
        if meta is not None:
            _check_model(ws, meta, embedding_model_name(config.embedding_model))
    chunks = read_chunks(ws)
    return write_index(ws, chunks, load_embedder(config.embedding_model), config, rebuild=rebuild,
                       progress=progress)


class ChunkIndex:
    """An opened index: vector and full-text search over the chunks."""

    def __init__(self, ws: Workspace, config: RagConfig | None = None) -> None:
        self.ws = ws
        self.config = config or RagConfig()
        meta = read_meta(ws)
        if meta is None or not ws.index_dir.exists():
            raise EngrainError(f"There is no index in {ws.index_dir}.",
                               hint=f"Build it: engrain index -w {ws.root}")
        _check_model(ws, meta, embedding_model_name(self.config.embedding_model))
        self.meta = meta
        self.table = _open_table(ws, _connect(ws))
        if self.table is None or self.table.count_rows() == 0:
            raise EngrainError(f"The index in {ws.index_dir} is empty: it holds no chunks.",
                               hint=f"Ingest documents, then index them: engrain ingest DOCS_DIR -w {ws.root} && "
                                    f"engrain index -w {ws.root}")
        self.embedder = load_embedder(self.config.embedding_model)
        if self.embedder.dim != meta.get("dim"):
            raise EngrainError(f"The index in {ws.index_dir} holds {meta.get('dim')}-dimensional vectors but "
                               f"'{self.embedder.name}' makes {self.embedder.dim}-dimensional ones.",
                               hint=rebuild_hint(ws))

    def __len__(self) -> int:
        return self.table.count_rows()

    def embed(self, queries: list[str]) -> np.ndarray:
        return self.embedder.encode(queries)

    def vector_search(self, vector: np.ndarray, k: int) -> list[Hit]:
        q = self.table.search(np.asarray(vector, dtype=np.float32), vector_column_name="vector")
        q = q.distance_type("cosine").limit(k).select(["id", "doc_id", "text", "_distance"])
        if self.meta.get("ann"):
            q = q.nprobes(self.config.nprobes)
        return [Hit(r["id"], r["doc_id"], r["text"], 1.0 - float(r["_distance"])) for r in self._run(q)]

    def text_search(self, query: str, k: int) -> list[Hit]:
        query = _fts_safe(query)
        if not query:
            return []
        q = self.table.search(query, query_type="fts").limit(k).select(["id", "doc_id", "text", "_score"])
        return [Hit(r["id"], r["doc_id"], r["text"], float(r["_score"])) for r in self._run(q)]

    def _run(self, query) -> list[dict]:
        try:
            return query.to_list()
        except Exception as exc:
            raise EngrainError(f"Searching the index in {self.ws.index_dir} failed ({type(exc).__name__}: "
                               f"{str(exc)[:200]}); the table may be corrupt.", hint=rebuild_hint(self.ws)) from exc


def _fts_safe(text: str) -> str:
    """Plain words only: the full-text engine would read quotes, colons and operators as query syntax."""
    import re

    return " ".join(re.findall(r"\w+", text))


def index_exists(path: Path) -> bool:
    return (path / META).exists()

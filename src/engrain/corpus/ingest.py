"""Turn a folder of documents into the workspace corpus, incrementally.

One run:
1. scan (scan.py): walk the folder (include/exclude globs; hidden entries and symlinks leaving the folder skipped);
2. hash: a file whose size and mtime match the last run is unchanged without being read; otherwise its bytes
   are hashed, and a file with the same hash as last time is unchanged without being parsed;
3. parse the new and changed files (parse_pool.py: a small process pool when there are many);
4. dedup: documents with identical text are stored once, under the first path; the others become aliases;
5. chunk only documents whose text (or the chunk settings) changed; reuse the chunks of the rest;
6. write chunks.jsonl, documents.jsonl and corpus/manifest.json atomically.

A file that fails is reported with its reason and never costs what the workspace already had: if an earlier
version of it was ingested, that version stays (with ``error`` set). Documents whose file disappeared are kept
as ``status: "removed"`` records so later stages can drop what they built from them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from ..atomic import write_json, write_jsonl
from ..config import IngestConfig
from ..errors import EngrainError
from ..progress import Progress
from ..workspace import Workspace
from .chunking import chunk_text, sha256, token_starts
from .parse_pool import ParseJournal, parse_all
from .parsers import FORMATS
from .scan import scan
from .schema import Chunk, Document

PARSER_VERSION = 3  # bump when parsers change their output, so every file is parsed again (3: plain-text titles)
MANIFEST_NAME = "manifest.json"
TOKENIZE_BATCH = 64  # documents per call to the fast tokenizer


@dataclass
class IngestSummary:
    source: str
    workspace: str
    files_seen: int = 0
    ingested: int = 0  # files parsed successfully in this run (new or changed)
    unchanged: int = 0  # files skipped because they did not change
    failed: list[dict] = field(default_factory=list)  # [{"path", "reason"}]: supported files that could not be read
    skipped: list[dict] = field(default_factory=list)  # [{"path", "reason"}]: unsupported formats, outside links
    excluded: int = 0  # files left out by include/exclude globs
    resumed: int = 0  # files whose parse result came from an interrupted earlier run
    warnings: list[dict] = field(default_factory=list)  # [{"path", "message"}]: ingested, but with a caveat
    duplicates: list[dict] = field(default_factory=list)  # [{"path", "same_as"}]
    documents: int = 0  # documents in the corpus after this run (status "ok")
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    tokens: int = 0  # tokens in the corpus
    tokens_processed: int = 0  # tokens of the documents chunked in this run
    chunks: int = 0
    chunks_new: int = 0
    seconds: float = 0.0
    phases: dict = field(default_factory=dict)  # seconds per phase: read (scan+hash), parse, dedup, chunk, write
    written: bool = False

    @property
    def exit_code(self) -> int:
        """0 all good; 1 some files failed but the corpus was written; 2 nothing usable."""
        if self.documents == 0 or not self.written:
            return 2
        return 1 if self.failed else 0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["exit_code"] = self.exit_code
        out["docs_per_s"] = round(self.files_seen / self.seconds, 1) if self.seconds else None
        out["tokens_per_s"] = round(self.tokens_processed / self.seconds, 1) if self.seconds else None
        return out


# --------------------------------------------------------------------------------------------------
# The run: the steps of ``ingest``, in order
# --------------------------------------------------------------------------------------------------


def ingest(source: Path | str, workspace: Workspace, config: IngestConfig | None = None, *, tokenizer=None,
           model: str | None = None, progress: bool = False) -> IngestSummary:
    """Ingest ``source`` into ``workspace``; see the module docstring. Raises EngrainError for unusable input."""
    clock = _Clock()
    cfg = config or IngestConfig()
    source = _checked_source(source, cfg)
    summary = IngestSummary(source=str(source.resolve()), workspace=str(workspace.root), phases=clock.phases)
    files = _scan(source, cfg, summary)  # 1. scan
    prev = _read_previous(workspace)
    settings = {"chunk_tokens": cfg.chunk_tokens, "chunk_overlap": cfg.chunk_overlap,
                "json_text_field": cfg.json_text_field, "parser_version": PARSER_VERSION,
                "tokenizer": model or "embedded"}
    old_source = prev.manifest.get("source")
    if old_source and old_source != summary.source:
        summary.warnings.append({"path": ".", "message": f"this workspace was ingested from {old_source}; "
                                                         f"its documents not found here are marked removed"})
    known = _Files(prev, {rel: fmt for rel, _, fmt in files}, summary)

    todo = _hash(files, cfg, known, progress)  # 2. stat and hash: decide what must be parsed
    summary.unchanged = sum(1 for rel in known.docs if not known.state[rel].get("error"))
    clock.phase("read")
    journal = ParseJournal(workspace.corpus_dir / "ingest-partial.jsonl")
    parsed = _parse_changed(todo, cfg, known, journal, progress)  # 3. parse what is new or changed
    clock.phase("parse")
    fresh = _take_parsed(todo, parsed, known)
    texts = _dedup(known.docs, prev, summary)  # 4. identical texts stored once; document ids
    documents, to_chunk = _documents(texts, fresh, known, prev, rechunk_all=prev.manifest.get("settings") != settings)
    if not documents:  # every file failed and nothing earlier survives: write nothing, keep what exists
        journal.finish()
        summary.seconds = clock.total()
        return summary

    chunks = {doc_id: prev.chunks[doc_id] for doc_id, d in documents.items() if d.change == "unchanged"}
    clock.phase("dedup")
    _chunk(to_chunk, chunks, cfg, tokenizer, model, progress, summary)  # 5. chunk only what changed
    _mark_removed(documents, prev.docs, summary)
    clock.phase("chunk")
    _write_corpus(workspace, documents, chunks, summary)  # 6. chunks.jsonl, documents.jsonl
    clock.phase("write")
    summary.seconds = clock.total()
    # The manifest is written last: if we crash before it, the next run re-hashes and finds nothing lost.
    journal.finish()
    write_json(workspace.corpus_dir / MANIFEST_NAME,
               {"version": 1, "source": summary.source, "settings": settings, "files": known.state,
                "last_run": {k: v for k, v in summary.to_dict().items() if k not in ("new", "changed")}})
    return summary


class _Clock:
    """Seconds per phase of a run (read, parse, dedup, chunk, write), each from the end of the one before."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def phase(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(self.phases.get(name, 0.0) + now - self.last, 3)
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.start


def _checked_source(source: Path | str, cfg: IngestConfig) -> Path:
    """The folder to ingest, after refusing settings and paths that cannot work."""
    if cfg.chunk_tokens < 8:
        raise EngrainError(f"chunk_tokens={cfg.chunk_tokens} is too small.",
                           hint=f"Use at least 8 (default {IngestConfig().chunk_tokens}).")
    if not 0 <= cfg.chunk_overlap < cfg.chunk_tokens:
        raise EngrainError(f"chunk_overlap={cfg.chunk_overlap} must be >= 0 and below chunk_tokens "
                           f"({cfg.chunk_tokens}).", hint=f"Try --chunk-overlap {cfg.chunk_tokens // 8}.")
    source = Path(source).expanduser()
    if not source.exists():
        raise EngrainError(f"{source} does not exist.", hint="Pass the folder of documents to ingest.")
    if not source.is_dir():
        raise EngrainError(f"{source} is a file, not a folder.", hint="Pass the folder that contains it.")
    return source


def _scan(source: Path, cfg: IngestConfig, summary: IngestSummary) -> list[tuple[str, Path, str]]:
    """The supported files as (relative path, path, format); EngrainError when there are none."""
    files, skipped, excluded = scan(source, cfg)
    summary.skipped, summary.excluded = skipped, excluded
    summary.files_seen = len(files) + len(skipped)
    if not files:
        seen = f"{len(skipped)} file(s) of other formats" if skipped else "no files"
        raise EngrainError(f"No supported documents in {source} ({seen}"
                           + (f", {excluded} excluded by include/exclude globs" if excluded else "") + ").",
                           hint=f"Supported: {', '.join(sorted(FORMATS))}. Check the path and --include/--exclude.")
    return files


@dataclass
class _Previous:
    """What the last run left: its documents by id (removed ones too), their chunks, and its manifest."""

    docs: dict[str, Document]
    chunks: dict[str, list[Chunk]]
    manifest: dict


def _read_previous(ws: Workspace) -> _Previous:
    from .schema import read_chunks, read_documents

    docs: dict[str, Document] = {}
    chunks: dict[str, list[Chunk]] = defaultdict(list)
    if ws.documents_path.exists():
        docs = {d.id: d for d in read_documents(ws, include_removed=True)}
    if ws.chunks_path.exists():
        for c in read_chunks(ws):
            chunks[c.doc_id].append(c)
    manifest: dict = {}
    path = ws.corpus_dir / MANIFEST_NAME
    if path.exists():
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            manifest = {}  # only a cache: without it every file is hashed again, nothing is lost
    return _Previous(docs, chunks, manifest)


class _Files:
    """This run's manifest entry of each file (``state``) and the documents it holds (``docs``, key and sha256),
    next to the last run's entries (``prev``) and texts (``known_text``) that an unchanged or failed file reuses."""

    def __init__(self, prev: _Previous, formats: dict[str, str], summary: IngestSummary) -> None:
        self.prev: dict = prev.manifest.get("files", {})
        self.known_text = {d.sha256: d for d in prev.docs.values() if d.status == "ok"}
        self.formats = formats  # rel -> format
        self.summary = summary
        # Files parsed by another parser version are parsed again even when unchanged; a failing one still keeps
        # its last good version.
        self.same_parser = prev.manifest.get("settings", {}).get("parser_version") == PARSER_VERSION
        self.state: dict[str, dict] = {}
        self.docs: dict[str, list[dict]] = {}

    def reusable(self, entry: dict | None) -> bool:
        return bool(entry) and not entry.get("error") and all(d["sha256"] in self.known_text for d in entry["docs"])

    def keep(self, rel: str, entry: dict) -> None:
        self.state[rel], self.docs[rel] = entry, entry["docs"]

    def fail(self, rel: str, reason: str) -> None:
        """Report the file; keep its last good version (if any) rather than lose the document."""
        self.summary.failed.append({"path": rel, "reason": reason})
        prev = self.prev.get(rel)
        if self.reusable(prev) or (prev and prev.get("error") and prev.get("docs")
                                   and self.reusable({**prev, "error": ""})):
            self.keep(rel, {**prev, "error": reason})
        else:
            self.state[rel] = {**self.state.get(rel, {}), "docs": [], "error": reason}


def _hash(files: list[tuple[str, Path, str]], cfg: IngestConfig, known: _Files,
          show: bool) -> list[tuple[str, Path, str]]:
    """The files to parse. A file whose size and mtime match the last run keeps its entry without being read; one
    whose bytes hash as last time keeps it without being parsed."""
    limit = int(cfg.max_file_mb * 1024 * 1024)
    todo: list[tuple[str, Path, str]] = []
    with Progress(show, len(files), 0, "hashing") as bar:
        for rel, path, fmt in files:
            bar.advance()
            try:
                st = path.stat()
            except OSError as exc:
                known.fail(rel, f"cannot read ({exc.strerror or exc})")
                continue
            if st.st_size > limit:
                known.fail(rel, f"over the size limit ({st.st_size / 2**20:.2f} MB > {cfg.max_file_mb:g} MB); "
                                f"raise ingest.max_file_mb")
                continue
            prev = known.prev.get(rel) if known.same_parser else None
            if known.reusable(prev) and prev["bytes"] == st.st_size and prev["mtime_ns"] == st.st_mtime_ns:
                known.keep(rel, prev)
                continue
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError as exc:
                known.fail(rel, f"cannot read ({exc.strerror or exc})")
                continue
            state = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
            if known.reusable(prev) and prev["sha256"] == digest:  # touched, not changed
                known.keep(rel, {**prev, **state})
                continue
            known.state[rel] = state
            todo.append((rel, path, fmt))
    return todo


def _parse_changed(todo: list[tuple[str, Path, str]], cfg: IngestConfig, known: _Files, journal: ParseJournal,
                   show: bool) -> dict[str, tuple]:
    """rel -> (docs, reason) for each file to parse; a result an interrupted run journaled for the same bytes is
    taken as it is."""
    digests = {rel: known.state[rel]["sha256"] for rel, _, _ in todo}
    parsed = {rel: journal.done[(rel, d)] for rel, d in digests.items() if (rel, d) in journal.done}
    known.summary.resumed = len(parsed)
    remaining = [t for t in todo if t[0] not in parsed]
    if remaining:
        with Progress(show, len(remaining), 0, "parsing") as bar:
            parsed.update(parse_all(remaining, cfg, bar.advance,
                                     lambda rel, docs, reason: journal.add(rel, digests[rel], docs, reason)))
    journal.flush()
    return parsed


def _take_parsed(todo: list[tuple[str, Path, str]], parsed: dict[str, tuple], known: _Files) -> dict[str, dict]:
    """Each parsed file's documents into its entry, a failed one reported; sha256 -> the fields of a document
    parsed now (the first of each text)."""
    summary = known.summary
    fresh: dict[str, dict] = {}
    for rel, _, _ in todo:
        docs, reason = parsed[rel]
        if docs is None:
            known.fail(rel, reason)
            continue
        summary.ingested += 1
        file_docs = []
        for d in docs:
            d["sha256"] = sha256(d["text"])
            d["meta"]["file_sha256"] = known.state[rel]["sha256"]
            if d["key"]:
                d["meta"]["key"] = d["key"]
            d["meta"]["warnings"] = d.pop("warnings")
            for message in d["meta"]["warnings"]:
                summary.warnings.append({"path": rel + (f" [{d['key']}]" if d["key"] else ""), "message": message})
            fresh.setdefault(d["sha256"], d)
            file_docs.append({"key": d["key"], "sha256": d["sha256"]})
        known.state[rel]["docs"] = file_docs
        known.state[rel].pop("error", None)
        known.docs[rel] = file_docs
    summary.failed.sort(key=lambda f: f["path"])
    return fresh


@dataclass
class _Texts:
    """Each distinct text once: the (path, key) that holds it, the other copies' names, and the document ids."""

    canon: dict[tuple[str, str], str]  # (rel, key) -> sha256, canonical sources only
    aliases: dict[str, list[str]]  # sha256 -> "rel#key" of the other copies
    ids: dict[tuple[str, str], str]  # (rel, key) -> document id


def _dedup(entries: dict[str, list[dict]], prev: _Previous, summary: IngestSummary) -> _Texts:
    """Documents with identical text are stored once; ids are the path without extension, and the owner of a
    clash (the document that had the id last time) keeps it."""
    by_text: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for rel in sorted(entries):
        for d in entries[rel]:
            by_text[d["sha256"]].append((rel, d["key"]))
    canon: dict[tuple[str, str], str] = {}
    aliases: dict[str, list[str]] = {}
    previous_paths = {(d.path, d.meta.get("key", "")) for d in prev.docs.values() if d.status == "ok"}
    for digest, sources in by_text.items():
        # the copy that held the text last time keeps it (stable ids), else the shallowest path
        sources.sort(key=lambda rk: ((rk[0], rk[1]) not in previous_paths, rk[0].count("/"), rk))
        canon[sources[0]] = digest
        aliases[digest] = [rel + (f"#{key}" if key else "") for rel, key in sources[1:]]
    by_id: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for rel, key in canon:
        by_id[_doc_id(rel, key)].append((rel, key))
    ids: dict[tuple[str, str], str] = {}
    for doc_id, owners in by_id.items():
        old = prev.docs.get(doc_id)
        owners.sort(key=lambda rk: (not (old and old.path == rk[0]), rk))
        ids[owners[0]] = doc_id
        for rel, key in owners[1:]:
            ids[(rel, key)] = _doc_id(rel, key, with_extension=True)
    for sources in by_text.values():
        for rel, key in sources[1:]:
            summary.duplicates.append({"path": rel + (f"#{key}" if key else ""), "same_as": ids[sources[0]]})
    return _Texts(canon, aliases, ids)


def _doc_id(rel: str, key: str, with_extension: bool = False) -> str:
    base = rel if with_extension else str(PurePosixPath(rel).with_suffix(""))
    return f"{base}/{key}" if key else base


def _documents(texts: _Texts, fresh: dict[str, dict], known: _Files, prev: _Previous,
               rechunk_all: bool) -> tuple[dict[str, Document], list[Document]]:
    """This run's documents by id, and those to chunk: their text changed, or the chunk settings did."""
    documents: dict[str, Document] = {}
    to_chunk: list[Document] = []
    for (rel, key), digest in sorted(texts.canon.items()):
        doc_id = texts.ids[(rel, key)]
        src = fresh.get(digest)
        if src is not None:
            text, title, headings, meta = src["text"], src["title"], src["headings"], src["meta"]
        else:
            old = known.known_text[digest]
            text, title, headings, meta = old.text, old.title, old.headings, dict(old.meta)
        state = known.state[rel]
        doc = Document(id=doc_id, path=rel, format=known.formats[rel], text=text, sha256=digest,
                       title=title or PurePosixPath(rel).stem, bytes=state["bytes"], meta=meta,
                       headings=headings, aliases=texts.aliases[digest], error=state.get("error", ""))
        old = prev.docs.get(doc_id)
        reuse = (not rechunk_all and old is not None and old.status == "ok" and old.sha256 == digest
                 and doc_id in prev.chunks)
        if reuse:
            doc.tokens, doc.change = old.tokens, "unchanged"
        else:
            doc.change = "new" if old is None or old.status != "ok" else "changed"
            to_chunk.append(doc)
        documents[doc_id] = doc
    return documents, to_chunk


def _chunk(to_chunk: list[Document], chunks: dict[str, list[Chunk]], cfg: IngestConfig, tokenizer,
           model: str | None, show: bool, summary: IngestSummary) -> None:
    """Chunks of each document in ``to_chunk`` into ``chunks``, token offsets found a batch of documents at a time."""
    if not to_chunk:
        return
    if tokenizer is None:
        from .chunking import load_tokenizer

        tokenizer = load_tokenizer(model)
    with Progress(show, len(to_chunk), 0, "chunking") as bar:
        for i in range(0, len(to_chunk), TOKENIZE_BATCH):
            batch = to_chunk[i:i + TOKENIZE_BATCH]
            for doc, starts in zip(batch, token_starts(tokenizer, [d.text for d in batch])):
                doc.tokens = len(starts)
                chunks[doc.id] = chunk_text(doc.id, doc.text, doc.headings, starts, cfg.chunk_tokens,
                                            cfg.chunk_overlap)
                summary.tokens_processed += doc.tokens
                summary.chunks_new += len(chunks[doc.id])
            bar.advance(len(batch))


def _mark_removed(documents: dict[str, Document], prev_docs: dict[str, Document], summary: IngestSummary) -> None:
    """Documents of the last run that no file provides any more stay, as "removed" records without text."""
    for doc_id, old in prev_docs.items():
        if doc_id in documents:
            continue
        change = "removed" if old.status == "ok" else "unchanged"
        documents[doc_id] = Document(id=doc_id, path=old.path, format=old.format, text="", sha256=old.sha256,
                                     title=old.title, bytes=old.bytes, status="removed", change=change,
                                     meta={"removed_at": old.meta.get("removed_at") if change == "unchanged"
                                           else time.strftime("%Y-%m-%dT%H:%M:%S")})
        if change == "removed":
            summary.removed.append(doc_id)


def _write_corpus(ws: Workspace, documents: dict[str, Document], chunks: dict[str, list[Chunk]],
                  summary: IngestSummary) -> None:
    """chunks.jsonl and documents.jsonl, each replaced atomically, and the counts of what they hold."""
    ordered = [documents[k] for k in sorted(documents)]
    all_chunks = [c for d in ordered if d.status == "ok" for c in chunks.get(d.id, [])]
    ws.corpus_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(ws.chunks_path, (_row(c) for c in all_chunks))
    write_jsonl(ws.documents_path, (_row(d) for d in ordered))
    summary.written = True
    ok = [d for d in ordered if d.status == "ok"]
    summary.documents = len(ok)
    summary.tokens = sum(d.tokens for d in ok)
    summary.chunks = len(all_chunks)
    summary.new = [d.id for d in ok if d.change == "new"]
    summary.changed = [d.id for d in ok if d.change == "changed"]


def _row(record) -> dict:
    """A record's fields as a dict for json: shallow, unlike dataclasses.asdict, whose deep copy dominated re-runs."""
    return {name: getattr(record, name) for name in record.__dataclass_fields__}

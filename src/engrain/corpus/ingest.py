"""Turn a folder of documents into the workspace corpus, incrementally.

One run:
1. scan: walk the folder (include/exclude globs; hidden entries and symlinks leaving the folder are skipped);
2. hash: a file whose size and mtime match the last run is unchanged without being read; otherwise its bytes
   are hashed, and a file with the same hash as last time is unchanged without being parsed;
3. parse the new and changed files (a small process pool when there are many);
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
import os
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from ..atomic import write_json, write_jsonl
from ..config import IngestConfig
from ..errors import EngrainError
from ..workspace import Workspace
from .chunking import chunk_text, sha256, token_starts
from .parsers import FORMATS, ParseError, assemble, format_of, parse
from .schema import Chunk, Document

PARSER_VERSION = 2  # bump when parsers change their output, so every file is parsed again
MANIFEST_NAME = "manifest.json"
TOKENIZE_BATCH = 64  # documents per call to the fast tokenizer
POOL_MIN_FILES = 200  # below this, starting worker processes costs more than it saves


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
# Scanning
# --------------------------------------------------------------------------------------------------


def _glob_regex(pattern: str) -> re.Pattern:
    """gitignore-like: '**' spans folders, '*' and '?' stay inside one; no '/' means any depth."""
    pattern = pattern.strip().lstrip("./") if pattern.startswith("./") else pattern.strip()
    anchored = "/" in pattern.rstrip("/")
    pattern = pattern.rstrip("/")
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        out.append("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c))
        i += 1
    body = "".join(out)
    return re.compile(("^" if anchored else "^(?:.*/)?") + body + "(?:/.*)?$")


def _matches(rel: str, patterns: list[re.Pattern]) -> bool:
    return any(p.match(rel) for p in patterns)


def scan(source: Path, cfg: IngestConfig) -> tuple[list[tuple[str, Path, str]], list[dict], int]:
    """(files as (relative path, path, format), skipped [{"path", "reason"}], number excluded by globs)."""
    root = source.resolve()
    include = [_glob_regex(p) for p in cfg.include]
    exclude = [_glob_regex(p) for p in cfg.exclude]
    files: list[tuple[str, Path, str]] = []
    skipped: list[dict] = []
    excluded = 0
    visited = {root}
    stack = [(source, "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            skipped.append({"path": prefix or ".", "reason": f"cannot list folder ({exc.strerror})"})
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith(".") and cfg.skip_hidden:
                continue
            rel = prefix + entry.name
            path = Path(entry.path)
            try:
                if entry.is_symlink():
                    target = path.resolve()
                    if not target.is_relative_to(root):
                        skipped.append({"path": rel, "reason": "symlink to outside the folder (not followed)"})
                        continue
                    if target.is_dir() and target in visited:
                        continue  # a loop, or a folder we walk anyway
                is_dir = entry.is_dir()
            except OSError as exc:
                skipped.append({"path": rel, "reason": f"cannot read ({exc.strerror or exc})"})
                continue
            if is_dir:
                if not _matches(rel, exclude):
                    visited.add(path.resolve())
                    subfolders.append((path, rel + "/"))
                continue
            if not entry.is_file():
                continue  # sockets, fifos, broken links
            if _matches(rel, exclude) or (include and not _matches(rel, include)):
                excluded += 1
                continue
            fmt = format_of(entry.name)
            if fmt is None:
                suffix = PurePosixPath(entry.name).suffix or "(no extension)"
                skipped.append({"path": rel, "reason": f"unsupported format {suffix}"})
                continue
            files.append((rel, path, fmt))
        stack.extend(reversed(subfolders))
    return files, skipped, excluded


# --------------------------------------------------------------------------------------------------
# Parsing (runs in worker processes too: plain data in, plain data out)
# --------------------------------------------------------------------------------------------------


def _parse_one(data: bytes, fmt: str, text_field: str) -> tuple[list[dict] | None, str]:
    """([{"key", "title", "text", "headings", "meta", "warnings"}], "") or (None, reason)."""
    try:
        parsed = parse(data, fmt, json_text_field=text_field)
    except ParseError as exc:
        return None, str(exc)
    except Exception as exc:  # a parser library crashing on hostile input is this file's failure, not the run's
        return None, f"could not parse ({type(exc).__name__}: {exc})"
    docs = []
    for p in parsed:
        assembled = assemble(p.blocks)
        if not assembled.text.strip():
            continue
        docs.append({"key": p.key, "title": p.title, "text": assembled.text, "headings": assembled.headings,
                     "meta": p.meta, "warnings": p.warnings})
    if not docs:
        return None, "no text after cleaning"
    return docs, ""


def _parse_batch(items: list[tuple[str, str, str]], text_field: str) -> list[tuple[str, list[dict] | None, str]]:
    out = []
    for rel, path, fmt in items:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            out.append((rel, None, f"cannot read ({exc.strerror or exc})"))
            continue
        docs, reason = _parse_one(data, fmt, text_field)
        out.append((rel, docs, reason))
    return out


class _ParseJournal:
    """Parse results appended as they come (corpus/ingest-partial.jsonl), so a crashed or interrupted run's
    parsing is not lost: the next run takes a file's result from here when the file's hash still matches.
    Deleted once the corpus is written."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[tuple[str, str], tuple] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                    self.done[(row["path"], row["file_sha256"])] = (row["docs"], row["reason"])
                except (ValueError, KeyError, TypeError):
                    continue  # the line a crash cut short
        self.file = None

    def add(self, rel: str, digest: str, docs: list[dict] | None, reason: str) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a", encoding="utf-8")
        self.file.write(json.dumps({"path": rel, "file_sha256": digest, "docs": docs, "reason": reason},
                                   ensure_ascii=False) + "\n")

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def finish(self) -> None:
        if self.file is not None:
            self.file.close()
        self.path.unlink(missing_ok=True)


def _parse_all(todo: list[tuple[str, Path, str]], cfg: IngestConfig, advance, record) -> dict[str, tuple]:
    """rel -> (docs, reason) for every file in ``todo``; a spawn pool of workers when there are many files.
    ``record(rel, docs, reason)`` sees each result as soon as it exists."""
    items = [(rel, str(path), fmt) for rel, path, fmt in todo]
    results: dict[str, tuple] = {}
    workers = cfg.workers or max(1, min(4, (os.cpu_count() or 1) - 1))
    if workers > 1 and len(items) >= POOL_MIN_FILES:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: the parent may hold torch/tokenizer threads that fork would copy in a broken state
        size = max(4, min(32, len(items) // (workers * 8)))
        batches = [items[i:i + size] for i in range(0, len(items), size)]
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_parse_batch, batch, cfg.json_text_field) for batch in batches]
            for future in as_completed(futures):
                for rel, docs, reason in future.result():
                    results[rel] = (docs, reason)
                    record(rel, docs, reason)
                    advance()
        return results
    for item in items:
        for rel, docs, reason in _parse_batch([item], cfg.json_text_field):
            results[rel] = (docs, reason)
            record(rel, docs, reason)
            advance()
    return results


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _read_previous(ws: Workspace) -> tuple[dict[str, Document], dict[str, list[Chunk]], dict]:
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
    return docs, chunks, manifest


def _row(record) -> dict:
    """A record's fields as a dict for json: shallow, unlike dataclasses.asdict, whose deep copy dominated re-runs."""
    return {name: getattr(record, name) for name in record.__dataclass_fields__}


def _doc_id(rel: str, key: str, with_extension: bool = False) -> str:
    base = rel if with_extension else str(PurePosixPath(rel).with_suffix(""))
    return f"{base}/{key}" if key else base


class _Progress:
    """A rich progress bar on stderr with an ETA, or nothing."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                console=Console(stderr=True), transient=False)

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)

    def task(self, name: str, total: int):
        if not self.bar:
            return lambda n=1: None
        task_id = self.bar.add_task(name, total=total)
        return lambda n=1: self.bar.advance(task_id, n)


def ingest(source: Path | str, workspace: Workspace, config: IngestConfig | None = None, *, tokenizer=None,
           model: str | None = None, progress: bool = False) -> IngestSummary:
    """Ingest ``source`` into ``workspace``; see the module docstring. Raises EngrainError for unusable input."""
    t0 = time.perf_counter()
    cfg = config or IngestConfig()
    clock = [t0]

    def phase(name: str) -> None:
        now = time.perf_counter()
        summary.phases[name] = round(summary.phases.get(name, 0.0) + now - clock[0], 3)
        clock[0] = now

    if cfg.chunk_tokens < 8:
        raise EngrainError(f"chunk_tokens={cfg.chunk_tokens} is too small.", hint="Use at least 8 (default 256).")
    if not 0 <= cfg.chunk_overlap < cfg.chunk_tokens:
        raise EngrainError(f"chunk_overlap={cfg.chunk_overlap} must be >= 0 and below chunk_tokens "
                           f"({cfg.chunk_tokens}).", hint="Try --chunk-overlap 32.")
    source = Path(source).expanduser()
    if not source.exists():
        raise EngrainError(f"{source} does not exist.", hint="Pass the folder of documents to ingest.")
    if not source.is_dir():
        raise EngrainError(f"{source} is a file, not a folder.", hint="Pass the folder that contains it.")
    summary = IngestSummary(source=str(source.resolve()), workspace=str(workspace.root))

    files, skipped, excluded = scan(source, cfg)
    summary.skipped, summary.excluded = skipped, excluded
    summary.files_seen = len(files) + len(skipped)
    if not files:
        seen = f"{len(skipped)} file(s) of other formats" if skipped else "no files"
        raise EngrainError(f"No supported documents in {source} ({seen}"
                           + (f", {excluded} excluded by include/exclude globs" if excluded else "") + ").",
                           hint=f"Supported: {', '.join(sorted(FORMATS))}. Check the path and --include/--exclude.")

    prev_docs, prev_chunks, manifest = _read_previous(workspace)
    prev_files: dict = manifest.get("files", {})
    settings = {"chunk_tokens": cfg.chunk_tokens, "chunk_overlap": cfg.chunk_overlap,
                "json_text_field": cfg.json_text_field, "parser_version": PARSER_VERSION,
                "tokenizer": model or "embedded"}
    rechunk_all = manifest.get("settings") != settings
    if manifest.get("source") and manifest["source"] != summary.source:
        summary.warnings.append({"path": ".", "message": f"this workspace was ingested from {manifest['source']}; "
                                                         f"its documents not found here are marked removed"})
    known_text = {d.sha256: d for d in prev_docs.values() if d.status == "ok"}
    limit = int(cfg.max_file_mb * 1024 * 1024)

    # 1-2. stat and hash: decide what must be parsed
    file_state: dict[str, dict] = {}  # rel -> manifest entry for this run
    entries: dict[str, list[dict]] = {}  # rel -> its documents (key, sha256) when readable
    todo: list[tuple[str, Path, str]] = []
    formats = {rel: fmt for rel, _, fmt in files}

    def reusable(entry: dict | None) -> bool:
        return bool(entry) and not entry.get("error") and all(d["sha256"] in known_text for d in entry["docs"])

    def fail(rel: str, reason: str) -> None:
        """Report the file; keep its last good version (if any) rather than lose the document."""
        summary.failed.append({"path": rel, "reason": reason})
        prev = prev_files.get(rel)
        if reusable(prev) or (prev and prev.get("error") and prev.get("docs") and reusable({**prev, "error": ""})):
            file_state[rel] = {**prev, "error": reason}
            entries[rel] = prev["docs"]
        else:
            file_state[rel] = {**file_state.get(rel, {}), "docs": [], "error": reason}

    with _Progress(progress) as bar:
        advance = bar.task("hashing", len(files))
        for rel, path, fmt in files:
            advance()
            try:
                st = path.stat()
            except OSError as exc:
                fail(rel, f"cannot read ({exc.strerror or exc})")
                continue
            if st.st_size > limit:
                fail(rel, f"over the size limit ({st.st_size / 2**20:.2f} MB > {cfg.max_file_mb:g} MB); "
                          f"raise ingest.max_file_mb")
                continue
            prev = prev_files.get(rel)
            if reusable(prev) and prev["bytes"] == st.st_size and prev["mtime_ns"] == st.st_mtime_ns:
                file_state[rel], entries[rel] = prev, prev["docs"]
                continue
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError as exc:
                fail(rel, f"cannot read ({exc.strerror or exc})")
                continue
            state = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
            if reusable(prev) and prev["sha256"] == digest:  # touched, not changed
                file_state[rel], entries[rel] = {**prev, **state}, prev["docs"]
                continue
            file_state[rel] = state
            todo.append((rel, path, fmt))
        summary.unchanged = sum(1 for rel in entries if not file_state[rel].get("error"))

        # 3. parse what is new or changed
        phase("read")
        journal = _ParseJournal(workspace.corpus_dir / "ingest-partial.jsonl")
        parsed = {rel: journal.done[(rel, file_state[rel]["sha256"])] for rel, _, _ in todo
                  if (rel, file_state[rel]["sha256"]) in journal.done}
        summary.resumed = len(parsed)
        remaining = [t for t in todo if t[0] not in parsed]
        last_flush = [time.perf_counter()]

        def record(rel: str, docs, reason: str) -> None:
            journal.add(rel, file_state[rel]["sha256"], docs, reason)
            if time.perf_counter() - last_flush[0] > 2.0:
                journal.flush()
                last_flush[0] = time.perf_counter()

        if remaining:
            parsed.update(_parse_all(remaining, cfg, bar.task("parsing", len(remaining)), record))
        journal.flush()
        phase("parse")
    fresh: dict[str, dict] = {}  # sha256 -> a parsed document's fields, for the documents parsed now
    for rel, _, _ in todo:
        docs, reason = parsed[rel]
        if docs is None:
            fail(rel, reason)
            continue
        summary.ingested += 1
        file_docs = []
        for d in docs:
            d["sha256"] = sha256(d["text"])
            d["meta"]["file_sha256"] = file_state[rel]["sha256"]
            if d["key"]:
                d["meta"]["key"] = d["key"]
            d["meta"]["warnings"] = d.pop("warnings")
            for message in d["meta"]["warnings"]:
                summary.warnings.append({"path": rel + (f" [{d['key']}]" if d["key"] else ""), "message": message})
            fresh.setdefault(d["sha256"], d)
            file_docs.append({"key": d["key"], "sha256": d["sha256"]})
        file_state[rel]["docs"] = file_docs
        file_state[rel].pop("error", None)
        entries[rel] = file_docs
    summary.failed.sort(key=lambda f: f["path"])

    # 4. dedup identical texts; assign ids (the path without extension; the owner of a clash keeps it)
    by_text: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for rel in sorted(entries):
        for d in entries[rel]:
            by_text[d["sha256"]].append((rel, d["key"]))
    canon: dict[tuple[str, str], str] = {}  # (rel, key) -> sha256, canonical sources only
    aliases: dict[str, list[str]] = {}
    previous_paths = {(d.path, d.meta.get("key", "")) for d in prev_docs.values() if d.status == "ok"}
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
        old = prev_docs.get(doc_id)
        owners.sort(key=lambda rk: (not (old and old.path == rk[0]), rk))
        ids[owners[0]] = doc_id
        for rel, key in owners[1:]:
            ids[(rel, key)] = _doc_id(rel, key, with_extension=True)
    for sources in by_text.values():
        for rel, key in sources[1:]:
            summary.duplicates.append({"path": rel + (f"#{key}" if key else ""), "same_as": ids[sources[0]]})

    # 5-6. build documents; chunk only what changed
    documents: dict[str, Document] = {}
    to_chunk: list[Document] = []
    for (rel, key), digest in sorted(canon.items()):
        doc_id = ids[(rel, key)]
        src = fresh.get(digest)
        if src is not None:
            text, title, headings, meta = src["text"], src["title"], src["headings"], src["meta"]
        else:
            old = known_text[digest]
            text, title, headings, meta = old.text, old.title, old.headings, dict(old.meta)
        state = file_state[rel]
        doc = Document(id=doc_id, path=rel, format=formats[rel], text=text, sha256=digest,
                       title=title or PurePosixPath(rel).stem, bytes=state["bytes"], meta=meta,
                       headings=headings, aliases=aliases[digest], error=state.get("error", ""))
        old = prev_docs.get(doc_id)
        reuse = (not rechunk_all and old is not None and old.status == "ok" and old.sha256 == digest
                 and doc_id in prev_chunks)
        if reuse:
            doc.tokens, doc.change = old.tokens, "unchanged"
        else:
            doc.change = "new" if old is None or old.status != "ok" else "changed"
            to_chunk.append(doc)
        documents[doc_id] = doc
    if not documents:  # every file failed and nothing earlier survives: write nothing, keep what exists
        journal.finish()
        summary.seconds = time.perf_counter() - t0
        return summary

    chunks: dict[str, list[Chunk]] = {doc_id: prev_chunks[doc_id] for doc_id, d in documents.items()
                                      if d.change == "unchanged"}
    phase("dedup")
    if to_chunk:
        if tokenizer is None:
            from .chunking import load_tokenizer

            tokenizer = load_tokenizer(model)
        with _Progress(progress) as bar:
            advance = bar.task("chunking", len(to_chunk))
            for i in range(0, len(to_chunk), TOKENIZE_BATCH):
                batch = to_chunk[i:i + TOKENIZE_BATCH]
                for doc, starts in zip(batch, token_starts(tokenizer, [d.text for d in batch])):
                    doc.tokens = len(starts)
                    chunks[doc.id] = chunk_text(doc.id, doc.text, doc.headings, starts, cfg.chunk_tokens,
                                                cfg.chunk_overlap)
                    summary.tokens_processed += doc.tokens
                    summary.chunks_new += len(chunks[doc.id])
                advance(len(batch))

    # removed: documents of the last run that no file provides any more
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

    phase("chunk")
    ordered = [documents[k] for k in sorted(documents)]
    all_chunks = [c for d in ordered if d.status == "ok" for c in chunks.get(d.id, [])]
    workspace.corpus_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(workspace.chunks_path, (_row(c) for c in all_chunks))
    write_jsonl(workspace.documents_path, (_row(d) for d in ordered))
    summary.written = True
    ok = [d for d in ordered if d.status == "ok"]
    summary.documents = len(ok)
    summary.tokens = sum(d.tokens for d in ok)
    summary.chunks = len(all_chunks)
    summary.new = [d.id for d in ok if d.change == "new"]
    summary.changed = [d.id for d in ok if d.change == "changed"]
    phase("write")
    summary.seconds = time.perf_counter() - t0
    # The manifest is written last: if we crash before it, the next run re-hashes and finds nothing lost.
    journal.finish()
    write_json(workspace.corpus_dir / MANIFEST_NAME,
               {"version": 1, "source": summary.source, "settings": settings, "files": file_state,
                "last_run": {k: v for k, v in summary.to_dict().items() if k not in ("new", "changed")}})
    return summary

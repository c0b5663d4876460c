"""Parsing the files an ingest run must read: each file's bytes to documents (in a spawn pool of worker processes
when there are many: plain data in, plain data out), and the journal that keeps the results across a crash."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..config import IngestConfig
from ..jsonl import read_jsonl
from .parsers import ParseError, assemble, parse

POOL_MIN_FILES = 200  # below this, starting worker processes costs more than it saves
JOURNAL_FLUSH_S = 2.0  # how often the parse journal reaches the disk: a crash loses at most this much parsing


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


class ParseJournal:
    """Parse results appended as they come (corpus/ingest-partial.jsonl), so a crashed or interrupted run's
    parsing is not lost: the next run takes a file's result from here when the file's hash still matches.
    Deleted once the corpus is written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[tuple[str, str], tuple] = {}
        if path.exists():
            for _, row in read_jsonl(path, skip_bad=True):  # skip_bad: the line a crash cut short
                try:
                    self.done[(row["path"], row["file_sha256"])] = (row["docs"], row["reason"])
                except (KeyError, TypeError):
                    continue
        self.file = None
        self.flushed = time.perf_counter()

    def add(self, rel: str, digest: str, docs: list[dict] | None, reason: str) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a", encoding="utf-8")
        self.file.write(json.dumps({"path": rel, "file_sha256": digest, "docs": docs, "reason": reason},
                                   ensure_ascii=False) + "\n")
        if time.perf_counter() - self.flushed > JOURNAL_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()
        self.flushed = time.perf_counter()

    def finish(self) -> None:
        if self.file is not None:
            self.file.close()
        self.path.unlink(missing_ok=True)


def parse_all(todo: list[tuple[str, Path, str]], cfg: IngestConfig, advance: Callable[[], object],
              record: Callable[[str, list[dict] | None, str], object]) -> dict[str, tuple]:
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


"""Append-only JSONL files under WORKSPACE/synth/, safe against a kill at any instant.

``<strategy>.jsonl`` holds the items the trainer reads. ``progress/<strategy>.jsonl`` holds one line per
chunk (by content hash) whose synthesis finished, with its counts. A batch is written items first, then
progress, each flushed and fsynced; a restart drops a torn last line, skips chunks already in progress and
item ids already present. A kill between the two writes re-runs those chunks and skips their written ids:
no duplicate and nothing lost.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..jsonl import read_jsonl


def item_id(strategy: str, chunk_sha: str, variant: str) -> str:
    """Stable id of one item: the same strategy, chunk content and variant slot give the same id."""
    return hashlib.sha256(f"{strategy}\x00{chunk_sha}\x00{variant}".encode()).hexdigest()[:20]


def _repair_tail(path: Path) -> None:
    """Cut a torn last line (a write interrupted by a kill) so appends start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        size = f.seek(0, os.SEEK_END)
        block = min(size, 1 << 20)
        while True:
            f.seek(size - block)
            data = f.read(block)
            cut = data.rfind(b"\n")
            if cut >= 0 or block == size:
                break
            block = min(size, block * 2)
        f.truncate(size - block + cut + 1 if cut >= 0 else 0)
        f.flush()
        os.fsync(f.fileno())


def _complete_rows(path: Path) -> list[dict]:
    """Every complete JSON line of ``path``; a torn or garbled line is skipped, not fatal."""
    if not path.exists():
        return []
    return [row for _, row in read_jsonl(path, skip_bad=True, tolerate_torn_tail=True)]


class AppendLog:
    """One append-only JSONL file: ``append(rows)`` writes, flushes and fsyncs the whole batch."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _repair_tail(self.path)

    def rows(self) -> list[dict]:
        return _complete_rows(self.path)

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        with self.path.open("ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


class StrategyStore:
    """The item file and progress file of one strategy."""

    def __init__(self, synth_dir: Path, strategy: str) -> None:
        self.strategy = strategy
        self.items = AppendLog(Path(synth_dir) / f"{strategy}.jsonl")
        self.progress = AppendLog(Path(synth_dir) / "progress" / f"{strategy}.jsonl")
        rows = self.items.rows()
        self.ids = {r["id"] for r in rows if "id" in r}
        self.existing = rows
        self.done = {r["key"]: r for r in self.progress.rows() if "key" in r}

    def write_batch(self, items: list[dict], progress: list[dict]) -> list[dict]:
        """Append the items not already present, then the progress lines; returns the items written."""
        fresh = [it for it in items if it["id"] not in self.ids]
        self.items.append(fresh)
        self.ids.update(it["id"] for it in fresh)
        self.progress.append(progress)
        for p in progress:
            self.done[p["key"]] = p
        return fresh


def read_items(synth_dir: Path, strategies: list[str] | None = None, current_shas: set[str] | None = None) -> list[dict]:
    """Items of the given strategies (all when None). With ``current_shas``, only items whose source
    chunks all still exist in the corpus (a re-ingested, changed chunk leaves its old items stale)."""
    out: list[dict] = []
    for path in sorted(Path(synth_dir).glob("*.jsonl")):
        if strategies and path.stem not in strategies:
            continue
        for row in _complete_rows(path):
            shas = row.get("chunk_sha256") or []
            if current_shas is not None and not set(shas if isinstance(shas, list) else [shas]) <= current_shas:
                continue
            out.append(row)
    return out

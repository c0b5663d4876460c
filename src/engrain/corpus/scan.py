"""Which files of a folder to ingest: include/exclude globs (gitignore-like), hidden entries and symlinks that leave
the folder skipped, each file's format from its name."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from ..config import IngestConfig
from .parsers import format_of


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


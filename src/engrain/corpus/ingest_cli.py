"""`engrain ingest`: merge flags into the workspace config, run the ingest with a progress bar, print a summary."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..config import load_config, save_config
from ..workspace import Workspace
from .ingest import IngestSummary, ingest


def ingest_command(docs_dir: Path, workspace: Path, *, include: list[str] | None, exclude: list[str] | None,
                   chunk_tokens: int | None, chunk_overlap: int | None, max_file_mb: float | None,
                   model: str | None, as_json: bool, emit: Callable[[dict], None]) -> int:
    """Run the ingest; return the exit status (0 ok, 1 some files failed, 2 nothing usable)."""
    ws = Workspace.at(workspace)
    config = load_config(ws.config_path)
    cfg = config.ingest
    # Flags override the config file; the file then records what this run used.
    updates = {"include": include or None, "exclude": exclude or None, "chunk_tokens": chunk_tokens,
               "chunk_overlap": chunk_overlap, "max_file_mb": max_file_mb}
    cfg = cfg.model_copy(update={k: v for k, v in updates.items() if v is not None})
    summary = ingest(docs_dir, ws, cfg, model=model or config.model.name, progress=not as_json)
    if summary.written:
        config.ingest = cfg.model_copy(update={"source": summary.source})
        save_config(config, ws.config_path)
    if as_json:
        emit(summary.to_dict())
    else:
        print_summary(summary)
    return summary.exit_code


def print_summary(s: IngestSummary) -> None:
    console = Console(stderr=True)
    table = Table(title=f"ingest {s.source} → {s.workspace}", show_header=False)
    rows = [("files seen", s.files_seen), ("ingested (new or changed)", s.ingested), ("unchanged", s.unchanged),
            ("failed", len(s.failed)), ("skipped", len(s.skipped)), ("excluded by globs", s.excluded),
            ("duplicates stored once", len(s.duplicates)), ("removed", len(s.removed)),
            ("documents", s.documents), ("tokens", f"{s.tokens:,}"), ("chunks", f"{s.chunks:,} ({s.chunks_new:,} new)"),
            ("time", f"{s.seconds:.1f} s")]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)
    for title, items, key in (("failed", s.failed, "reason"), ("skipped", s.skipped, "reason"),
                              ("warnings", s.warnings, "message")):
        if items:
            console.print(f"[bold]{title}[/bold]")
            for item in items[:50]:
                console.print(f"  {item['path']}: {item[key]}", markup=False, highlight=False)
            if len(items) > 50:
                console.print(f"  ... and {len(items) - 50} more (see --json)")
    if not s.written:
        console.print("[bold red]nothing could be ingested[/bold red]; the workspace was left as it was")

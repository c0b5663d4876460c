"""The ``engrain synth`` verb: flags over the workspace config, run or plan, print a summary table."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..config import load_config, save_config
from ..errors import EngrainError
from ..workspace import Workspace


def synth_command(workspace: Path, *, strategies: str | None, generator: str | None, generator_model: str | None,
                  model: str | None, per_chunk: int | None, exclude_questions: list[Path] | None,
                  grounding: str | None, seed: int | None, dry_run: bool, as_json: bool,
                  emit: Callable[[dict], None]) -> int:
    from .run import STRATEGIES, run_synth

    ws = Workspace.at(workspace)
    if not ws.chunks_path.exists():
        raise EngrainError(f"{ws.chunks_path} does not exist.", hint="Run `engrain ingest DOCS_DIR -w WORKSPACE` first.")
    config = load_config(ws.config_path)
    cfg = config.synth
    updates: dict = {}
    if strategies:
        names = [s.strip() for s in strategies.split(",") if s.strip()]
        unknown = [n for n in names if n not in STRATEGIES]
        if unknown or not names:
            raise EngrainError(f"--strategies: unknown strategy {', '.join(unknown) or '(none given)'}.",
                               hint=f"Choose from: {', '.join(STRATEGIES)}.")
        updates["strategies"] = names
    for key, value in (("generator", generator), ("generator_model", generator_model), ("per_chunk", per_chunk),
                       ("grounding", grounding), ("seed", seed)):
        if value is not None:
            updates[key] = value
    if per_chunk is not None and per_chunk < 0:
        raise EngrainError("--per-chunk must be 0 or more.")
    if grounding is not None and grounding not in ("off", "lenient", "strict"):
        raise EngrainError(f"--grounding: unknown level '{grounding}'.", hint="Use off, lenient or strict.")
    cfg = cfg.model_copy(update=updates)
    summary = run_synth(ws, cfg, model_spec=model, exclude_questions=exclude_questions, dry_run=dry_run,
                        show_progress=not as_json)
    if not dry_run:
        config.synth = cfg
        save_config(config, ws.config_path)
    if as_json:
        emit(summary)
    else:
        _print(summary)
    if dry_run:
        return 0
    usage = summary.get("usage") or {}
    starved = [n for n, r in summary["strategies"].items() if r["chunks_run"] and not r["accepted"]
               and not r["already_present"]]
    return 1 if usage.get("errors") or starved else 0


def _print(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if summary.get("dry_run"):
        table = Table(title=f"engrain synth --dry-run · {summary['chunks']} chunks")
        for col in ("strategy", "chunks to do", "done", "items", "requests", "prompt tok", "gen tok"):
            table.add_column(col, justify="right" if col != "strategy" else "left")
        for name, p in summary["strategies"].items():
            table.add_row(name, str(p["chunks_todo"]), str(p["chunks_done"]),
                          str(p.get("items_target", p.get("items_max", ""))), str(p.get("requests", 0)),
                          f"{p['prompt_tokens']:,}", f"{p['completion_tokens']:,}")
        console.print(table)
        console.print(f"estimated time: ~{summary['estimated_seconds'] / 60:.1f} min "
                      f"({summary['estimate_basis']})")
        return
    table = Table(title=f"engrain synth · {summary['chunks']} chunks · generator {summary.get('generator') or '-'}")
    for col in ("strategy", "chunks", "generated", "accepted", "rate", "rejected (top reasons)", "under-covered",
                "items/min"):
        table.add_column(col, justify="left" if col in ("strategy", "rejected (top reasons)") else "right")
    for name, r in summary["strategies"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in list(r["rejected"].items())[:4]) or "-"
        skipped = f" (+{r['chunks_done_before']} done)" if r["chunks_done_before"] else ""
        table.add_row(name, f"{r['chunks_run']}{skipped}", str(r["generated"]), str(r["accepted"]),
                      f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-", reasons,
                      str(r["under_covered_count"]), str(r["accepted_per_min"] or "-"))
    console.print(table)
    usage = summary.get("usage")
    if usage:
        cost = f" · ${usage['cost_usd']:.4f}" if usage.get("cost_usd") else ""
        console.print(f"tokens: {usage['prompt_tokens']:,} prompt + {usage['completion_tokens']:,} generated · "
                      f"{usage['requests']} requests · {usage['retries']} retries · {usage['errors']} errors{cost}")
    leak = summary["leak_guard"]
    if leak["questions"]:
        overlapping = max((r["chunks_overlapping_questions"] for r in summary["strategies"].values()), default=0)
        console.print(f"leak guard: {leak['questions']} question texts ({leak['mode']} mode); "
                      f"{overlapping} chunks share text with them; items dropped for leaks: "
                      f"{sum(r['rejected'].get('leak', 0) for r in summary['strategies'].values())}")
    console.print(f"done in {summary['seconds']:.1f} s · output in {Path(summary['workspace']) / 'synth'}/")

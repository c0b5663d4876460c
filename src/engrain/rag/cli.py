"""`engrain index`: merge flags into the workspace's rag config, build the index with a progress bar, print a
summary; with ``--eval BENCH_DIR`` also print retrieval recall@k against the benchmark's gold documents."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from ..config import load_config, save_config
from ..errors import EngrainError
from ..workspace import Workspace
from .index import build_index, read_meta
from .retrieval import load_questions, retrieval_recall


def index_command(workspace: Path, *, embedding_model: str | None, rebuild: bool, eval_dir: Path | None, k: int,
                  mode: str | None, rewrite_query: bool | None, model: str | None, as_json: bool,
                  emit: Callable[[dict], None]) -> int:
    ws = Workspace.at(workspace)
    config = load_config(ws.config_path)
    updates = {"embedding_model": embedding_model, "mode": mode, "rewrite_query": rewrite_query}
    rag = config.rag.model_copy(update={key: v for key, v in updates.items() if v is not None})
    try:
        rag = type(rag).model_validate(rag.model_dump())  # flags pass the same checks as the file
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise EngrainError(f"Invalid index option: {problems}.", hint="--mode takes hybrid, vector or bm25.") from exc
    summary = build_index(ws, rag, rebuild=rebuild, progress=not as_json)
    config.rag = rag
    save_config(config, ws.config_path)
    result = {"index": summary.to_dict()}
    if eval_dir is not None:
        lm = None
        if rag.rewrite_query:
            from ..models import load_model

            lm = load_model(model or config.model.name)
        result["recall"] = retrieval_recall(ws, load_questions(eval_dir), k, rag, lm=lm)
        result["recall"]["bench"] = str(eval_dir)
    if as_json:
        emit(result)
    else:
        print_summary(result, read_meta(ws) or {})
    return 0


def print_summary(result: dict, meta: dict) -> None:
    console = Console(stderr=True)
    s = result["index"]
    table = Table(title=f"index → {s['path']}", show_header=False)
    for key in ("chunks", "embedded", "unchanged", "deleted", "embedding_model", "dim", "ann"):
        table.add_row(key, str(s[key]))
    table.add_row("seconds", f"{s['seconds']:.1f}  ({s['chunks_per_s']:.0f} chunks/s embedded)")
    console.print(table)
    if "recall" in result:
        r = result["recall"]
        k = r["k"]
        rt = Table(title=f"retrieval recall@{k} on {r['bench']} ({r['mode']}"
                         + (", query rewriting" if r["rewrite_query"] else "") + ")")
        for col in ("questions", "hops", f"any gold doc in top {k}", f"all gold docs in top {k}"):
            rt.add_column(col)
        rt.add_row(str(r["n"]), "all", f"{r[f'recall@{k}_any']:.3f}", f"{r[f'recall@{k}_all']:.3f}")
        for hops, h in r["by_hops"].items():
            rt.add_row(str(h["n"]), hops, f"{h[f'recall@{k}_any']:.3f}", f"{h[f'recall@{k}_all']:.3f}")
        console.print(rt)

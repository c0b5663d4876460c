"""What each method needs built before it can answer, reusing what the workspace already holds.

    base          nothing
    context       the corpus (ingest)
    rag           the corpus and the index
    lora, ...     the corpus, synthetic data and the trained memory
    X+rag         both

Every stage is incremental, so calling ``prepare`` again costs little. Time spent building is recorded in
WS/build_times.json when work is done, so a reused memory still reports what it cost to build.
Benchmark questions reach synthesis only as its leak guard's exclusion list, never a prompt.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .atomic import write_json
from .config import load_config, save_config
from .errors import EngrainError
from .memory.base import BuildInfo
from .memory.kinds import HYBRID, NAMES, TRAINED, canonical
from .models import LM
from .workspace import Workspace


def _times_path(ws: Workspace) -> Path:
    return ws.root / "build_times.json"


def _record(ws: Workspace, stage: str, seconds: float, did_work: bool) -> float:
    """Store the stage's build time when it did work; return the stored time (the original cost when reused)."""
    path = _times_path(ws)
    times = json.loads(path.read_text()) if path.exists() else {}
    if did_work or stage not in times:
        times[stage] = round(seconds, 2)
        write_json(path, times)
    return float(times[stage])


def _disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def ensure_corpus(ws: Workspace, docs_dir: Path, lm: LM, only: list[str] | None = None) -> float:
    """Ingest ``docs_dir`` (only the files ``only`` names, relative to it, when given)."""
    from .corpus.ingest import ingest

    config = load_config(ws.config_path)
    settings = config.ingest
    if only is not None:
        settings = settings.model_copy(update={"include": list(only)})
    t0 = time.perf_counter()
    summary = ingest(docs_dir, ws, settings, model=lm.path, progress=True)
    if summary.exit_code == 2:
        raise EngrainError(f"Nothing could be ingested from {docs_dir}.", hint="Check the folder holds documents.")
    changed = bool(summary.ingested or summary.removed)
    return _record(ws, "ingest", time.perf_counter() - t0, changed)


def ensure_index(ws: Workspace) -> float:
    from .rag.index import build_index

    config = load_config(ws.config_path)
    t0 = time.perf_counter()
    summary = build_index(ws, config.rag, progress=True)
    changed = bool(summary.embedded or summary.deleted)
    return _record(ws, "index", time.perf_counter() - t0, changed)


def ensure_synth(ws: Workspace, lm: LM, exclude_questions: list[Path]) -> float:
    from .synth.run import run_synth

    config = load_config(ws.config_path)
    t0 = time.perf_counter()
    summary = run_synth(ws, config.synth, model_spec=lm.path, exclude_questions=exclude_questions, show_progress=True)
    did_work = any(r.get("chunks_run", 0) for r in summary.get("strategies", {}).values())
    return _record(ws, "synth", time.perf_counter() - t0, did_work)


def ensure_trained(ws: Workspace, kind: str, lm: LM, rebuild: bool) -> float:
    from .train.loop import train

    config = load_config(ws.config_path)
    cfg = config.train.model_copy(update={"memory": kind, "name": kind})
    meta = train(ws, cfg, lm.path, force=rebuild, lm=None)
    return float(meta.get("train_seconds", 0.0))


def prepare(method: str, workspace: Workspace, bench, lm: LM, *, rebuild: bool = False, seed: int = 0,
            stage_times: dict[str, float] | None = None) -> BuildInfo:
    """Build (or reuse) what ``method`` needs; returns its build time and the disk size of what it built.

    ``stage_times`` carries the stages already brought up to date by earlier methods of the same comparison, so
    the corpus, index and synthetic data are checked once per comparison, not once per method."""
    done = {} if stage_times is None else stage_times

    def once(stage: str, run) -> float:
        if stage not in done:
            done[stage] = run()
        return done[stage]

    method = canonical(method)
    parts = method.split("+")
    head, wants_rag = parts[0], parts[1:] == ["rag"]
    if len(parts) > 2 or (len(parts) == 2 and not wants_rag):
        raise EngrainError(f"Unknown method '{method}'.", hint="Hybrids are written X+rag, e.g. lora+rag.")
    if head not in NAMES:
        raise EngrainError(f"Unknown method '{method}'.", hint=f"Methods: {', '.join(NAMES)}, and X{HYBRID} hybrids.")
    if head == "base" and not wants_rag:
        return BuildInfo()
    if not workspace.config_path.exists():  # record the settings this comparison builds with
        save_config(load_config(workspace.config_path), workspace.config_path)
    info = BuildInfo()
    info.seconds += once("ingest", lambda: ensure_corpus(workspace, bench.docs_dir, lm, bench.doc_files))
    info.disk_bytes += 0 if head != "context" else _disk(workspace.corpus_dir)
    if head == "rag" or wants_rag:
        info.seconds += once("index", lambda: ensure_index(workspace))
        info.disk_bytes += _disk(workspace.index_dir)
    if head in TRAINED:
        info.seconds += once("synth", lambda: ensure_synth(workspace, lm, [bench.root / "questions.jsonl"]))
        info.seconds += ensure_trained(workspace, head, lm, rebuild)
        info.disk_bytes += _disk(workspace.memory_dir(head))
    return info

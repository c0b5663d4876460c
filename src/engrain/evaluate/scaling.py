"""The scaling study: latency and prompt tokens per question as the corpus grows (the cost curve).

For each size (e.g. 1k, 2k, 4k, 8k corpus tokens) a scratch workspace holds the first documents of the corpus
(in id order) up to that many tokens; when the corpus is smaller than a size, its documents are repeated under
new ids to reach it (cost depends on tokens, not on what they say; the point is marked ``repeated``).
``context`` and ``rag`` are measured on each scratch corpus; a trained memory answers closed-book, so its cost
is measured once per size on the real workspace (it should stay flat — that is the point of training).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ..atomic import write_jsonl
from ..corpus.schema import read_chunks, read_documents
from ..memory.registry import open_memory
from ..models import LM
from ..workspace import Workspace
from . import metrics

DEFAULT_SIZES = (1000, 2000, 4000, 8000)


def _scratch_corpus(ws: Workspace, target_tokens: int, root: Path) -> tuple[Workspace, int, bool]:
    docs = sorted(read_documents(ws), key=lambda d: d.id)
    chunks = read_chunks(ws)
    by_doc: dict[str, list] = {}
    for c in chunks:
        by_doc.setdefault(c.doc_id, []).append(c)
    picked_docs, picked_chunks, total, copy = [], [], 0, 0
    while total < target_tokens and docs:
        before = total
        for d in docs:
            if total >= target_tokens:
                break
            suffix = "" if copy == 0 else f"~copy{copy}"
            picked_docs.append(replace(d, id=d.id + suffix))
            picked_chunks += [replace(c, id=c.id + suffix, doc_id=d.id + suffix) for c in by_doc.get(d.id, [])]
            total += d.tokens or sum(c.tokens for c in by_doc.get(d.id, []))
        copy += 1
        if total == before:  # documents without tokens: nothing more to add
            break
    scratch = Workspace.at(root).ensure()
    write_jsonl(scratch.documents_path, [d.to_dict() for d in picked_docs])
    write_jsonl(scratch.chunks_path, [c.to_dict() for c in picked_chunks])
    if ws.config_path.exists():
        shutil.copy(ws.config_path, scratch.config_path)
    return scratch, total, copy > 1


def _time(memory, questions: list[str], max_new_tokens: int) -> dict:
    latencies, prompt_tokens = [], []
    for q in questions:
        t0 = time.perf_counter()
        ans = memory.answer([q], max_new_tokens=max_new_tokens)[0]
        latencies.append((time.perf_counter() - t0) * 1000)
        prompt_tokens.append(ans.prompt_tokens)
    return {"latency_ms_p50": metrics.percentile(latencies, 50), "latency_ms_p95": metrics.percentile(latencies, 95),
            "prompt_tokens_mean": sum(prompt_tokens) / len(prompt_tokens)}


def scaling_study(ws: Workspace, lm: LM, questions: list[str], methods: list[str], *,
                  sizes: tuple[int, ...] = DEFAULT_SIZES, max_new_tokens: int = 32) -> dict[str, list[dict]]:
    """``{method: [{"corpus_tokens", "latency_ms_p50", "latency_ms_p95", "prompt_tokens_mean", ...}]}``."""
    from ..rag.index import build_index

    curves: dict[str, list[dict]] = {m: [] for m in methods}
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="engrain-scaling-") as tmp:
            scratch, tokens, repeated = _scratch_corpus(ws, size, Path(tmp))
            for method in methods:
                if method == "context":
                    memory = open_memory("context", scratch, lm)
                elif method == "rag":
                    build_index(scratch)
                    memory = open_memory("rag", scratch, lm)
                else:
                    memory = open_memory(method, ws, lm)  # closed-book: corpus size does not enter the prompt
                point = _time(memory, questions, max_new_tokens)
                point.update(corpus_tokens=tokens, target_tokens=size, repeated=repeated)
                curves[method].append(point)
    return curves

"""The comparison's own leak check: no benchmark question or answer text in the data a memory was built from.

Synthesis already drops leaking items as it writes them; this check re-reads everything in WS/synth/ afterwards,
independently, so a comparison can never silently report a memory trained on its own test questions. Overlap that
the item's source documents explain is allowed (a cloze probe is the start of a document sentence); anything else
fails the comparison. Items made from chunks the corpus no longer holds (an earlier version of an edited document)
cannot be held to a source that is gone: they are counted as stale and not checked again (synthesis's leak guard
checked them when they were written, and ``engrain update`` no longer trains them).
"""

from __future__ import annotations

from pathlib import Path

from ..corpus.schema import read_documents
from ..errors import EngrainError
from ..jsonl import read_jsonl
from ..synth.leak import LeakGuard, load_question_texts
from ..workspace import Workspace


def _item_text(row: dict) -> str:
    if "messages" in row:
        return "\n".join(m.get("content", "") for m in row["messages"])
    return row.get("text", "")


def leak_check(ws: Workspace, questions_path: Path, n: int = 8) -> dict:
    """Scan every synthetic item; raise EngrainError listing the leaking items, else return the counts."""
    guard = LeakGuard(load_question_texts([questions_path]), n=n, mode="source")
    from ..corpus.schema import read_chunks
    from ..train.data import item_shas

    docs = {d.id: d.text for d in read_documents(ws, include_removed=True)}
    chunks = {c.sha256 for c in read_chunks(ws)}
    checked, stale, leaks = 0, 0, []
    for path in sorted(ws.synth_dir.glob("*.jsonl")) if ws.synth_dir.exists() else []:
        # skip_bad: a torn last line from a killed run is no item; the trainer reports it too
        for lineno, row in read_jsonl(path, skip_bad=True):
            if any(sha not in chunks for sha in item_shas(row)):
                stale += 1
                continue
            checked += 1
            source = "\n".join(docs.get(d, "") for d in row.get("doc_ids", []))
            if guard.leaked(_item_text(row), source):
                leaks.append(f"{path.name}:{lineno}")
    if leaks:
        raise EngrainError(f"Leak check failed: {len(leaks)} synthetic items in {ws.synth_dir} contain benchmark "
                           f"question text their source documents do not explain: {', '.join(leaks[:10])}"
                           + (" ..." if len(leaks) > 10 else ""),
                           hint="Delete those items (or the synth folder) and re-run synthesis with "
                                "--exclude-questions pointing at the benchmark's questions.jsonl.")
    return {"items_checked": checked, "leaks": 0, "ngram": n, "stale_items": stale}

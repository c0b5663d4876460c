"""A benchmark folder written for a test: docs/<id>.md per document and questions.jsonl (BENCHMARKS.md's layout)."""

from __future__ import annotations

import json
from pathlib import Path


def write_bench(root: Path, docs: dict[str, str], questions: list[dict]) -> Path:
    (root / "docs").mkdir(parents=True)
    for name, text in docs.items():
        (root / "docs" / f"{name}.md").write_text(text)
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return root

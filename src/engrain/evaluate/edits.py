"""Documents edited between arrivals: the changed facts of ``engrain compare --arrivals``.

Before each arrival after the first, one document that arrived earlier is edited the way a team edits a page: two of
its facts change. The edit swaps the gold answers of two of its questions in the document's text (each answer written
exactly once there), so each question's true answer is now the other's. The memory, updated on the edited document,
is then asked both questions: a changed fact counts as learned when the answer gives the new value, and the old value
still given is reported beside it. Every question that mentions either value is kept out of the retention measures.

The edited documents live in the scenario's own folder (``WS/arrivals/<bench>-docs/``); the benchmark is never
written to.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..atomic import write_bytes
from .bench import Bench, Question, doc_id

# Formats an edit can change by replacing text in the file; others (pdf, docx, html) are copied as they are.
EDITABLE = {".txt", ".md"}


@dataclass
class Edit:
    """At ``arrival``, ``doc`` (a file under docs/) has ``old[0]`` and ``old[1]`` swapped; ``questions`` maps the two
    asked question ids to (old answers, new answer)."""

    arrival: int
    doc: str
    old: tuple[str, str]
    questions: dict[str, tuple[list[str], str]]

    def to_dict(self) -> dict:
        return {"arrival": self.arrival, "doc": self.doc, "swapped": list(self.old),
                "questions": {q: {"old": old, "new": new} for q, (old, new) in self.questions.items()}}


def swappable(bench: Bench, file: str) -> tuple[Question, str, Question, str] | None:
    """Two questions about ``file`` alone whose first gold answers each occur exactly once in it, neither inside the
    other nor in either question's text (a question must not give its new answer away). None for a file whose
    format is not plain text."""
    if Path(file).suffix.lower() not in EDITABLE:
        return None
    text = (bench.docs_dir / file).read_text(encoding="utf-8")
    own = [(q, q.answers[0]) for q in bench.questions if q.docs == [doc_id(file)] and text.count(q.answers[0]) == 1]
    for i, (q1, a1) in enumerate(own):
        for q2, a2 in own[i + 1:]:
            if a1.lower() in a2.lower() or a2.lower() in a1.lower():
                continue
            if any(a.lower() in q.question.lower() for a in (a1, a2) for q in (q1, q2)):
                continue
            return q1, a1, q2, a2
    return None


def plan_edits(bench: Bench, batches: list[list[str]]) -> list[Edit]:
    """One edit before each arrival after the first, of the earliest document seen so far that can be edited."""
    edits: list[Edit] = []
    used: set[str] = set()
    for k in range(2, len(batches) + 1):
        for file in (f for part in batches[:k - 1] for f in part if f not in used):
            found = swappable(bench, file)
            if found:
                q1, a1, q2, a2 = found
                edits.append(Edit(k, file, (a1, a2), {q1.id: (q1.answers, a2), q2.id: (q2.answers, a1)}))
                used.add(file)
                break
    return edits


def edited_text(text: str, old: tuple[str, str]) -> str:
    a, b = old
    marker = "\x00engrain-swap\x00"
    return text.replace(a, marker).replace(b, a).replace(marker, b)


def write_docs(bench: Bench, folder: Path, seen: list[str], edits: list[Edit], k: int) -> None:
    """The documents of arrivals 1..k in ``folder``, with the edits made up to arrival k; files whose text is
    already right are not rewritten, so ingest sees only real changes."""
    changed = {e.doc: e for e in edits if e.arrival <= k}
    for file in seen:
        data = (bench.docs_dir / file).read_bytes()  # byte for byte: a pdf or docx must stay readable
        if file in changed:
            data = edited_text(data.decode("utf-8"), changed[file].old).encode("utf-8")
        target = folder / file
        if not target.is_file() or target.read_bytes() != data:
            write_bytes(target, data)


def questions_at(questions: list[Question], edits: list[Edit], k: int) -> list[Question]:
    """The questions as the documents stand after arrival k: an edited question's answer is its new value."""
    new = {q: n for e in edits if e.arrival <= k for q, (_, n) in e.questions.items()}
    return [replace(q, answers=[new[q.id]]) if q.id in new else q for q in questions]


def touched(questions: list[Question], edits: list[Edit]) -> set[str]:
    """Ids of every question an edit changes or that mentions a swapped value: kept out of retention."""
    values = [v.lower() for e in edits for v in e.old]
    return {q.id for q in questions
            if any(v in q.question.lower() or any(v in a.lower() for a in q.answers) for v in values)}

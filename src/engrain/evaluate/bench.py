"""Benchmark folders in the BENCHMARKS.md layout: ``docs/`` + ``questions.jsonl`` (+ ``SOURCE.md``).

Every problem is reported with the file, the line and the field, so a user can fix their own benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EngrainError
from ..jsonl import read_jsonl

QUESTION_TYPES = ("qa", "cloze")


@dataclass
class Question:
    id: str
    type: str
    question: str
    answers: list[str]
    docs: list[str] = field(default_factory=list)
    hops: int = 1
    tags: list[str] = field(default_factory=list)


def doc_id(file: str) -> str:
    """A document's id: its path under docs/ without the extension (what questions name in ``docs``)."""
    return Path(file).with_suffix("").as_posix()


def subset_name(bench_name: str, docs: int | None) -> str:
    """How a comparison on the first ``docs`` documents is named (its report folder too)."""
    return f"{bench_name}-{docs}docs" if docs else bench_name


@dataclass
class Bench:
    name: str
    root: Path
    questions: list[Question]
    doc_files: list[str] | None = None  # a subset of docs/ (relative paths) when not every document is used

    @property
    def docs_dir(self) -> Path:
        return self.root / "docs"

    def files(self) -> list[str]:
        """The documents used, as paths under docs/ in path order: the subset when there is one, else every file."""
        if self.doc_files is not None:
            return list(self.doc_files)
        return sorted(p.relative_to(self.docs_dir).as_posix() for p in self.docs_dir.rglob("*") if p.is_file())

    def first_docs(self, n: int) -> "Bench":
        """The first ``n`` documents by path, and only the questions every document of which is among them."""
        if n < 1:
            raise EngrainError(f"--docs is {n}.", hint="Give a number of documents of at least 1.")
        kept = self.files()[:n]
        ids = {doc_id(f) for f in kept}
        questions = [q for q in self.questions if q.docs and set(q.docs) <= ids]
        if not questions:
            raise EngrainError(f"No question of {self.root / 'questions.jsonl'} needs only the first {n} documents.",
                               hint="Use more documents (--docs), or leave --docs out.")
        return Bench(name=subset_name(self.name, n), root=self.root, questions=questions, doc_files=kept)


def read_questions(path: Path, doc_ids: set[str] | None = None) -> list[Question]:
    """Parse and validate a questions.jsonl; ``doc_ids`` (when given) must contain every ``docs`` entry."""
    if not path.is_file():
        raise EngrainError(f"{path} does not exist.", hint="A benchmark folder needs docs/ and questions.jsonl.")
    questions: list[Question] = []
    seen: set[str] = set()
    for lineno, row in read_jsonl(path, hint="Each line must be one JSON object."):
        where = f"{path}:{lineno}"
        for key in ("id", "question", "answers"):
            if key not in row:
                raise EngrainError(f"{where}: missing field '{key}'.", hint="See BENCHMARKS.md for the layout.")
        qid = str(row["id"])
        if qid in seen:
            raise EngrainError(f"{where}: duplicate id '{qid}'.", hint="Ids must be unique in the file.")
        seen.add(qid)
        qtype = row.get("type", "qa")
        if qtype not in QUESTION_TYPES:
            raise EngrainError(f"{where}: field 'type' is '{qtype}'.", hint=f"Use one of: {', '.join(QUESTION_TYPES)}.")
        answers = row["answers"]
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise EngrainError(f"{where}: field 'answers' must be a non-empty list of non-empty strings.")
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise EngrainError(f"{where}: field 'question' must be a non-empty string.")
        docs = row.get("docs", [])
        if not isinstance(docs, list):
            raise EngrainError(f"{where}: field 'docs' must be a list of document ids.")
        if doc_ids is not None:
            missing = [d for d in docs if d not in doc_ids]
            if missing:
                raise EngrainError(f"{where}: field 'docs' names {missing}, which are not under docs/.",
                                   hint="Ids are file names without extension.")
        questions.append(Question(id=qid, type=qtype, question=row["question"], answers=answers, docs=docs,
                                  hops=int(row.get("hops", max(1, len(docs)))), tags=list(row.get("tags", []))))
    if not questions:
        raise EngrainError(f"{path} holds no questions.")
    return questions


def load_bench(root: Path) -> Bench:
    root = Path(root)
    if not root.is_dir():
        raise EngrainError(f"Benchmark folder {root} does not exist.",
                           hint="Pass a folder with docs/ and questions.jsonl (see BENCHMARKS.md).")
    docs = root / "docs"
    if not docs.is_dir():
        raise EngrainError(f"{root} has no docs/ folder.", hint="Put one document per file under docs/.")
    doc_ids = {p.relative_to(docs).with_suffix("").as_posix() for p in docs.rglob("*") if p.is_file()}
    return Bench(name=root.name, root=root, questions=read_questions(root / "questions.jsonl", doc_ids))

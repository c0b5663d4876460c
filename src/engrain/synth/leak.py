"""The leak guard: benchmark questions and answers never reach a synthesis prompt or output.

Questions files follow the benchmark layout (one JSON object a line with ``question`` and ``answers``).
Their text becomes a set of word n-grams; anything synthesis sends or keeps is checked against it.

Documents may themselves contain a question's words (a cloze probe is the start of a document sentence),
so two modes:
  ``source`` (default): overlap that the source chunk(s) explain is allowed and reported; overlap that
      does not come from the source (it can only have come from the questions) drops the item, and a
      prompt whose instructions (everything but the chunk text) overlap stops the run;
  ``strict``: any overlap drops the item, and chunks that overlap are never put in a prompt.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import EngrainError
from ..jsonl import read_jsonl
from .text import ngrams, normalize

MODES = ("source", "strict")


def load_question_texts(paths: list[Path]) -> list[str]:
    """Question text and each question+answer joined (a cloze answer continues its question)."""
    texts: list[str] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise EngrainError(f"--exclude-questions: {path} does not exist.",
                               hint="Pass a questions.jsonl file in the benchmark layout (see BENCHMARKS.md).")
        hint = 'Each line must be a JSON object with a "question" field.'
        for lineno, row in read_jsonl(path, hint=hint):
            if "question" not in row:
                raise EngrainError(f"{path}:{lineno}: not a question record (no 'question' field).", hint=hint)
            question = row["question"]
            texts.append(str(question))
            for ans in row.get("answers") or []:
                texts.append(f"{question} {ans}")
    return texts


class LeakGuard:
    """Word n-gram overlap between synthesis text and benchmark questions."""

    def __init__(self, question_texts: list[str], n: int = 8, mode: str = "source") -> None:
        if mode not in MODES:
            raise EngrainError(f"Unknown leak mode '{mode}'.", hint=f"Use one of: {', '.join(MODES)}.")
        self.n, self.mode = n, mode
        self.grams: set[tuple[str, ...]] = set()
        self.short: dict[int, set[tuple[str, ...]]] = {}  # questions shorter than n words, matched whole
        for text in question_texts:
            toks = tuple(normalize(text).split())
            if len(toks) >= n:
                self.grams |= ngrams(list(toks), n)
            elif toks:
                self.short.setdefault(len(toks), set()).add(toks)
        self.count = len(question_texts)

    @property
    def active(self) -> bool:
        return bool(self.grams or self.short)

    def overlap(self, text: str) -> set[tuple[str, ...]]:
        toks = normalize(text).split()
        found = ngrams(toks, self.n) & self.grams if self.grams else set()
        for size, grams in self.short.items():
            found |= ngrams(toks, size) & grams
        return found

    def source_overlaps(self, source: str) -> bool:
        """Whether a chunk's own text shares n-grams with the questions (reported; blocks it in strict mode)."""
        return bool(self.overlap(source))

    def leaked(self, output: str, source: str) -> bool:
        """Whether ``output`` carries question n-grams; in ``source`` mode only those the source cannot explain."""
        hits = self.overlap(output)
        if not hits:
            return False
        if self.mode == "strict":
            return True
        return bool(hits - self.overlap(source))

    def check_instructions(self, prompt_without_source: str, where: str) -> None:
        """Prompt templates and few-shot examples must never carry question text: that is a bug, so stop."""
        if self.overlap(prompt_without_source):
            raise EngrainError(f"Leak guard: the {where} prompt template shares text with the excluded questions.",
                               hint="Change the template or few-shot examples; benchmark text must never reach "
                                    "synthesis.")

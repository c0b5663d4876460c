"""The Memory protocol: the seam between the ways of knowing documents and everything that uses them.

The evaluator, the server and the CLI only ever talk to a Memory:

    memory.build(workspace)            -> BuildInfo   (train, index, or nothing)
    memory.answer(questions)           -> [Answer]    (batched, in the chat template)
    memory.complete(starts)            -> [Answer]    (batched, raw continuation of sentence starts)
    memory.describe()                  -> dict        (for reports)

``ClosedBook`` is the simplest memory: the base model and the question alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..models import LM, Generation, answer, continue_text
from ..workspace import Workspace


@dataclass
class Answer:
    text: str
    latency_ms: float
    prompt_tokens: int
    completion_tokens: int = 0
    chunks: list[str] = field(default_factory=list)  # ids of chunks put in the prompt (rag)
    meta: dict = field(default_factory=dict)  # e.g. {"truncated": true}

    def to_dict(self) -> dict:
        return {"answer": self.text, "latency_ms": round(self.latency_ms, 1), "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "chunks": self.chunks, **self.meta}


@dataclass
class BuildInfo:
    seconds: float = 0.0
    disk_bytes: int = 0
    details: dict = field(default_factory=dict)


@runtime_checkable
class Memory(Protocol):
    name: str

    def build(self, workspace: Workspace) -> BuildInfo: ...

    def answer(self, questions: list[str], max_new_tokens: int = 48) -> list[Answer]: ...

    def complete(self, starts: list[str], max_new_tokens: int = 32) -> list[Answer]:
        """Continue each sentence start as plain text: no chat template, no system message, whatever the memory
        puts before it (documents, chunks) as plain text too. This is how cloze probes are meant to be asked: the
        start is text the model continues, not an instruction. ``Answer.text`` is the continuation alone, cut at
        its first newline (the rest of one sentence, not the paragraphs after it) and stripped."""
        ...

    def describe(self) -> dict: ...


class ClosedBook:
    """The base model answering from its weights alone (``base`` in comparisons)."""

    name = "base"

    def __init__(self, lm: LM, batch_size: int = 16) -> None:
        self.lm = lm
        self.batch_size = batch_size

    def build(self, workspace: Workspace) -> BuildInfo:
        return BuildInfo()

    def answer(self, questions: list[str], max_new_tokens: int = 48) -> list[Answer]:
        t0 = time.perf_counter()
        gens = answer(self.lm, questions, max_new_tokens=max_new_tokens, batch_size=self.batch_size)
        return _timed(gens, t0)

    def complete(self, starts: list[str], max_new_tokens: int = 32) -> list[Answer]:
        """The start alone, continued as raw text (see ``Memory.complete``)."""
        t0 = time.perf_counter()
        gens = continue_text(self.lm, starts, max_new_tokens=max_new_tokens, batch_size=self.batch_size)
        return _timed(gens, t0)

    def describe(self) -> dict:
        return {"memory": "base", "model": self.lm.name, "closed_book": True}


def _timed(gens: list[Generation], t0: float) -> list[Answer]:
    """Answers from generations; a batch shares one forward pass, so each latency is the batch time amortised."""
    per_q = (time.perf_counter() - t0) * 1000 / max(1, len(gens))
    return [Answer(g.text, per_q, g.prompt_tokens, g.completion_tokens) for g in gens]

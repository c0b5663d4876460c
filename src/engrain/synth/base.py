"""What strategies exchange with the runner.

A strategy turns a ``Unit`` (one chunk with its document) into ``Job``s (prompts for the generator) and
turns each completion into more jobs (a second stage) or ``Candidate`` items. The runner batches jobs
across chunks, checks candidates (grounding, leak guard, near-duplicates) and writes the survivors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..corpus.schema import Chunk, Document
from .text import split_sentences


@dataclass
class Unit:
    """One chunk to synthesise from: the coverage unit every quota is counted on."""

    chunk: Chunk
    doc: Document | None
    subject: str

    @property
    def key(self) -> str:
        return self.chunk.sha256

    @property
    def sentences(self) -> list[str]:
        # Paragraph by paragraph, so a heading line stays apart from the sentence below it.
        return [s for para in re.split(r"\n\s*\n", self.chunk.text) for s in split_sentences(para)]


@dataclass
class Job:
    unit: Unit
    variant: str
    messages: list[dict]
    source: str  # the text the output must be grounded in
    max_tokens: int
    stage: str = "write"
    temperature: float | None = None  # None: the run's sampling temperature
    partners: list[Unit] = field(default_factory=list)  # other chunks the job draws on (entities)
    data: dict = field(default_factory=dict)


@dataclass
class Candidate:
    unit: Unit
    variant: str
    source: str
    text: str | None = None  # continued-pretraining item
    messages: list[dict] | None = None  # question/answer item
    check: str = ""  # the text the grounding filter judges (model-made parts only)
    finish_reason: str = "stop"
    partners: list[Unit] = field(default_factory=list)
    reject: str = ""  # set by the strategy when its own check failed (e.g. the answer misses the target)
    prompt: str = ""
    context: list[Unit] = field(default_factory=list)  # chunks shown in the prompt (open-book items), in order

    @property
    def content(self) -> str:
        if self.text is not None:
            return self.text
        return "\n".join(m["content"] for m in self.messages or [])


def _named_instead(title: str, text: str) -> str:
    """A section heading such as "Our story" or "Visitor information" names nothing the text goes on to mention;
    the name of two or more words the document repeats most (twice or more) is then its subject. A title the text
    mentions stays, once is enough ("The Dunmore Works is a glass company ..."); the title as the text's own first
    line is its heading, not a mention."""
    from .text import names

    mentions = len(re.findall(re.escape(title.lower()), text.lower()))
    heading = text.strip().split("\n", 1)[0].strip("#*_ \t").lower() == title.lower()
    if mentions - heading >= 1:
        return title
    counts: dict[str, int] = {}
    for name in names(text):
        if len(name.split()) >= 2:
            counts[name] = counts.get(name, 0) + 1
    best = max(counts.items(), key=lambda kv: kv[1], default=(title, 0))
    return best[0] if best[1] >= 2 else title


def document_subject(doc: Document | None, chunk: Chunk) -> str:
    """What the document is about, to make a lifted sentence self-contained.

    The document title when it reads like one; otherwise the subject of the document's first sentence
    (the words before its first comma, bracket or verb "is/was"), which for expository text names the topic.
    """
    title = (doc.title if doc else "").strip()
    slug_like = bool(re.fullmatch(r"[\w\-./]+", title)) and ("-" in title or "_" in title)
    if title and not slug_like and len(title.split()) <= 12:
        return _named_instead(title, doc.text if doc else chunk.text)
    text = (doc.text if doc else chunk.text).strip()
    first = split_sentences(text[:600])[:1]
    if first:
        head = re.split(r"\s*[,(;:]|\s+(?:is|was|are|were|has|had)\s+", first[0], maxsplit=1)[0].strip()
        if 1 <= len(head.split()) <= 8:
            return head
    if title:
        return re.sub(r"[-_]+", " ", title.rsplit("/", 1)[-1]).strip()
    return chunk.doc_id

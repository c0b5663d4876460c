"""``rag``: the top-k retrieved chunks in the prompt, each labelled with its chunk id, the question after them.

``complete`` (raw continuation, for cloze probes) retrieves with the sentence start as the query and puts the
chunks' plain texts, unlabelled and outside any chat template, before the start.

Any LM reads them: the base model (``rag``) or a trained memory's model (``lora+rag``, ``prefix+rag``, ...;
see registry.open_memory). ``Answer.chunks`` lists the chunk ids put in the prompt, in retrieval order, so an
answer can be traced to its sources; ``meta["cited"]`` lists the ones the answer itself names.

Window policy: when the chunks, the question and the answer budget do not fit the model's window, the
lowest-ranked chunks are left out (recorded as ``meta["chunks_dropped"]``); a question that does not fit even
with no chunk is refused with an EngrainError.
"""

from __future__ import annotations

import time

from ..config import RagConfig, load_config
from ..errors import EngrainError
from ..rag.index import ChunkIndex, Hit, build_index
from ..models import (DEFAULT_SYSTEM, LM, answer, chat_messages, chat_prompt, check_starts, continuation_prompt,
                      continue_text, cut_continuation, fused_generate, generate, plain_chunks, render_chunks)
from ..rag.retrieval import Retriever
from ..workspace import Workspace
from .base import Answer, BuildInfo
from .gate import route


# A draft (rag.draft_query) is at most this many tokens, `engrain compare`'s answer length: its names come early, and a
# server request's longer answer budget would only make the search wait.
DRAFT_TOKENS = 48


def fuses(config: RagConfig, memory_model, base_model) -> bool:
    """Whether a hybrid of ``memory_model`` answers by fused decoding (models/fused.py): ``rag.hybrid: fused`` and
    both models run through engrain's decode loop, the one fused decoding is built on."""
    from ..models import fastgen

    return config.hybrid == "fused" and fastgen.supports(memory_model) and fastgen.supports(base_model)


class RagMemory:
    """Retrieve top-k chunks per question (hybrid by default), answer with them in the prompt."""

    def __init__(self, workspace: Workspace, lm: LM, config: RagConfig | None = None, *, name: str = "rag",
                 batch_size: int = 16, system: str | None = DEFAULT_SYSTEM) -> None:
        self.name = name
        self.workspace = workspace
        self.lm = lm
        self.config = config or load_config(workspace.config_path).rag
        self.batch_size = batch_size
        self.system = system
        self._retriever: Retriever | None = None
        # A hybrid (X+rag) takes its trained memory's relevance gate: a question far from the documents is answered
        # closed-book by ``fallback`` (the base model), as retrieved chunks would only distract it.
        self.gate = None
        self.fallback = None
        # A hybrid's base model: with rag.hybrid fused it reads the chunks, and the trained memory (``lm``) adds what
        # training changed about the closed-book answer (models/fused.py).
        self.base_lm: LM | None = None

    @property
    def retriever(self) -> Retriever:
        if self._retriever is None:  # opened on first use: `build` may come first
            self._retriever = Retriever(ChunkIndex(self.workspace, self.config), self.config, lm=self.lm)
        return self._retriever

    def build(self, workspace: Workspace) -> BuildInfo:
        summary = build_index(workspace, self.config)
        self._retriever = None
        disk = sum(p.stat().st_size for p in workspace.index_dir.rglob("*") if p.is_file())
        return BuildInfo(seconds=summary.seconds, disk_bytes=disk, details=summary.to_dict())

    def _prompt(self, text: str, hits: list[Hit], form: str) -> str:
        """The prompt for one question (``form="chat"``: labelled chunks and the question in the chat template) or
        one sentence start (``"continuation"``: the chunks' plain texts, a blank line, then the start)."""
        if form == "continuation":
            return continuation_prompt(text, plain_chunks([h.text for h in hits]) or None)
        context = render_chunks([(h.chunk_id, h.text) for h in hits]) if hits else None
        return chat_prompt(self.lm.tokenizer, chat_messages(text, context, self.system))

    def fit_prompt(self, text: str, hits: list[Hit], max_new_tokens: int,
                   form: str = "chat") -> tuple[str, list[Hit], int]:
        """The prompt of ``form`` with as many of the best chunks as fit the window, the chunks kept, its tokens."""
        tok = self.lm.tokenizer
        limit = self.lm.max_context - max_new_tokens
        kept = list(hits)
        while True:
            prompt = self._prompt(text, kept, form)
            n = len(tok(prompt, add_special_tokens=False)["input_ids"])
            if n <= limit:
                return prompt, kept, n
            if not kept:
                what = "sentence start" if form == "continuation" else "question"
                raise EngrainError(f"The {what} '{text[:60]}...' is {n} prompt tokens; with {max_new_tokens} "
                                   f"answer tokens it does not fit the model's window of {self.lm.max_context}.",
                                   hint=f"Shorten the {what} or lower the answer length.")
            kept.pop()  # the lowest-ranked chunk goes first

    def answer(self, questions: list[str], max_new_tokens: int = 48) -> list[Answer]:
        if self.gate is not None and questions:
            return route(self.gate, questions, lambda qs: self._respond(qs, max_new_tokens, "chat"),
                         lambda qs: self.fallback.answer(qs, max_new_tokens=max_new_tokens), self.name)
        return self._respond(questions, max_new_tokens, "chat")

    def complete(self, starts: list[str], max_new_tokens: int = 32) -> list[Answer]:
        """Retrieve with each start as the query, then continue the start as raw text after the kept chunks' plain
        texts (no chunk-id labels: in running text they read as noise); see ``Memory.complete``."""
        check_starts(starts)
        if self.gate is not None and starts:
            return route(self.gate, starts, lambda qs: self._respond(qs, max_new_tokens, "continuation"),
                         lambda qs: self.fallback.complete(qs, max_new_tokens=max_new_tokens), self.name)
        return self._respond(starts, max_new_tokens, "continuation")

    def drafts(self, texts: list[str], max_new_tokens: int, form: str, lm: LM | None = None) -> list[str]:
        """``rag.draft_query``: each question answered (or start continued) without retrieval by ``lm`` (this
        memory's model by default), the words a search for the answer's document can use. For a hybrid the model is
        the trained memory's, so a fact it learned names the document that holds the rest of a two-document
        answer."""
        lm, n = lm or self.lm, min(max_new_tokens, DRAFT_TOKENS)
        if form == "continuation":
            gens = continue_text(lm, texts, max_new_tokens=n, batch_size=self.batch_size)
        else:
            gens = answer(lm, texts, max_new_tokens=n, batch_size=self.batch_size, system=self.system)
        return [g.text for g in gens]

    @property
    def fused(self) -> bool:
        """Whether this memory answers by fused decoding (``fuses``); the memory reads the chunks otherwise."""
        return self.base_lm is not None and fuses(self.config, self.lm.model, self.base_lm.model)

    def _respond(self, texts: list[str], max_new_tokens: int, form: str) -> list[Answer]:
        t0 = time.perf_counter()
        drafts = self.drafts(texts, max_new_tokens, form) if self.config.draft_query else None
        retrieved = self.retriever.retrieve(texts, self.config.top_k, drafts)
        t_retrieve = (time.perf_counter() - t0) * 1000 / max(1, len(texts))
        fitted = [self.fit_prompt(t, hits, max_new_tokens, form) for t, hits in zip(texts, retrieved)]
        prompts = [p for p, _, _ in fitted]
        if self.fused:
            closed = [self._prompt(t, [], form) for t in texts]
            w = self.config.fused_weight
            gens = fused_generate([(self.base_lm, prompts, 1.0), (self.lm, closed, w), (self.base_lm, closed, -w)],
                                  max_new_tokens=max_new_tokens, batch_size=self.batch_size,
                                  one_line=form == "continuation")
        else:
            gens = generate(self.lm, prompts, max_new_tokens=max_new_tokens, batch_size=self.batch_size,
                            one_line=form == "continuation")
        if form == "continuation":
            gens = [cut_continuation(g) for g in gens]
        per_q = (time.perf_counter() - t0) * 1000 / max(1, len(texts))
        answers = []
        for g, (_, kept, _), hits, draft in zip(gens, fitted, retrieved, drafts or [None] * len(gens)):
            ids = [h.chunk_id for h in kept]
            meta = {"retrieval_ms": round(t_retrieve, 1), "cited": [i for i in ids if i in g.text],
                    "docs": list(dict.fromkeys(h.doc_id for h in kept))}
            if draft is not None:
                meta["draft"] = draft
            if len(kept) < len(hits):
                meta["chunks_dropped"] = [h.chunk_id for h in hits[len(kept):]]
            answers.append(Answer(g.text, per_q, g.prompt_tokens, g.completion_tokens, chunks=ids, meta=meta))
        return answers

    def describe(self) -> dict:
        return {"memory": self.name, "model": self.lm.name, "top_k": self.config.top_k, "mode": self.config.mode,
                "rrf_k": self.config.rrf_k, "candidates": self.config.candidates,
                "rewrite_query": self.config.rewrite_query, "draft_query": self.config.draft_query,
                **({"hybrid": "fused", "fused_weight": self.config.fused_weight} if self.fused
                   else {"hybrid": "read"} if self.base_lm is not None else {}),
                "embedding_model": self.config.embedding_model or "all-minilm-l6-v2",
                **({"gate": self.gate.describe()} if self.gate is not None else {})}

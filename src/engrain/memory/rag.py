"""``rag``: the top-k retrieved chunks in the prompt, each labelled with its chunk id, the question after them.

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
from ..index import ChunkIndex, Hit, build_index
from ..models import DEFAULT_SYSTEM, LM, chat_messages, chat_prompt, generate
from ..retrieval import Retriever
from ..workspace import Workspace
from .base import Answer, BuildInfo


def render_chunks(hits: list[Hit]) -> str:
    return "\n\n".join(f"[{h.chunk_id}]\n{h.text.strip()}" for h in hits)


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

    def _fit(self, question: str, hits: list[Hit], max_new_tokens: int) -> tuple[str, list[Hit], int]:
        """The prompt with as many of the best chunks as fit the window."""
        tok = self.lm.tokenizer
        limit = self.lm.max_context - max_new_tokens
        bare = chat_prompt(tok, chat_messages(question, None, self.system))
        bare_len = len(tok(bare, add_special_tokens=False)["input_ids"])
        if bare_len > limit:
            raise EngrainError(f"The question '{question[:60]}...' is {bare_len} prompt tokens; with {max_new_tokens} "
                               f"answer tokens it does not fit the model's window of {self.lm.max_context}.",
                               hint="Shorten the question or lower the answer length.")
        kept = list(hits)
        while True:
            prompt = chat_prompt(tok, chat_messages(question, render_chunks(kept) if kept else None, self.system))
            n = len(tok(prompt, add_special_tokens=False)["input_ids"])
            if n <= limit or not kept:
                return prompt, kept, n
            kept.pop()  # the lowest-ranked chunk goes first

    def answer(self, questions: list[str], max_new_tokens: int = 48) -> list[Answer]:
        t0 = time.perf_counter()
        retrieved = self.retriever.retrieve(questions, self.config.top_k)
        t_retrieve = (time.perf_counter() - t0) * 1000 / max(1, len(questions))
        fitted = [self._fit(q, hits, max_new_tokens) for q, hits in zip(questions, retrieved)]
        gens = generate(self.lm, [p for p, _, _ in fitted], max_new_tokens=max_new_tokens, batch_size=self.batch_size)
        per_q = (time.perf_counter() - t0) * 1000 / max(1, len(questions))
        answers = []
        for g, (_, kept, _), hits in zip(gens, fitted, retrieved):
            ids = [h.chunk_id for h in kept]
            meta = {"retrieval_ms": round(t_retrieve, 1), "cited": [i for i in ids if i in g.text],
                    "docs": list(dict.fromkeys(h.doc_id for h in kept))}
            if len(kept) < len(hits):
                meta["chunks_dropped"] = [h.chunk_id for h in hits[len(kept):]]
            answers.append(Answer(g.text, per_q, g.prompt_tokens, g.completion_tokens, chunks=ids, meta=meta))
        return answers

    def describe(self) -> dict:
        return {"memory": self.name, "model": self.lm.name, "top_k": self.config.top_k, "mode": self.config.mode,
                "rrf_k": self.config.rrf_k, "candidates": self.config.candidates,
                "rewrite_query": self.config.rewrite_query,
                "embedding_model": self.config.embedding_model or "all-minilm-l6-v2"}

"""Hybrid retrieval over the chunk index, and its quality measured on its own.

A question is searched two ways: by meaning (cosine similarity of MiniLM embeddings) and by words (BM25 on
LanceDB's full-text index). The two rankings are fused by reciprocal rank fusion,

    score(chunk) = sum over rankings r of  weight_r / (rrf_k + rank_r(chunk))     (rank from 1)

which needs no score calibration between retrievers (Cormack et al. 2009). With ``rewrite_query`` the model
first rewrites the question into a search query and both the original and the rewrite are searched and fused.

``retrieval_recall`` checks retrieval against the gold ``docs`` of benchmark questions, so a wrong answer can
be told apart as a retrieval miss (gold document not in the prompt) or a reading miss.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..config import RagConfig
from ..errors import EngrainError
from ..jsonl import read_jsonl
from ..workspace import Workspace
from .index import ChunkIndex, Hit

REWRITE_SYSTEM = ("Rewrite the user's question as a short search query: keep every name, number and key term, "
                  "drop filler words. Reply with the query only.")


def rrf_fuse(rankings: list[list[Hit]], weights: list[float] | None = None, rrf_k: int = 60) -> list[Hit]:
    """Fuse rankings by reciprocal rank; ties keep the order of first appearance. Scores become RRF scores."""
    weights = weights or [1.0] * len(rankings)
    score: dict[str, float] = defaultdict(float)
    first: dict[str, Hit] = {}
    for ranking, w in zip(rankings, weights):
        for rank, hit in enumerate(ranking, 1):
            score[hit.chunk_id] += w / (rrf_k + rank)
            first.setdefault(hit.chunk_id, hit)
    order = sorted(first, key=lambda cid: -score[cid])  # sorted() is stable: ties keep first appearance
    return [Hit(cid, first[cid].doc_id, first[cid].text, score[cid]) for cid in order]


class Retriever:
    """Top-k chunks for questions, by ``config.mode``: hybrid (default), vector or bm25."""

    def __init__(self, index: ChunkIndex, config: RagConfig | None = None, lm=None) -> None:
        self.index = index
        self.config = config or index.config
        self.lm = lm  # only for query rewriting
        if self.config.rewrite_query and lm is None:
            raise EngrainError("rag.rewrite_query is on but no model was given to rewrite queries with.",
                               hint="Pass the model, or set rag.rewrite_query: false.")

    def retrieve(self, questions: list[str], k: int | None = None,
                 drafts: list[str] | None = None) -> list[list[Hit]]:
        """The top-k chunks of each question; with ``drafts`` (an answer to each question given without retrieval),
        the question followed by its draft is searched too and fused with the question alone."""
        k = k or self.config.top_k
        queries = [[q] for q in questions]
        for qs, draft in zip(queries, drafts or []):
            if draft.strip():
                qs.append(f"{qs[0]} {draft.strip()}")
        if self.config.rewrite_query:
            for qs, rewrite in zip(queries, rewrite_queries(self.lm, questions)):
                if rewrite and rewrite.lower() != qs[0].lower():
                    qs.append(rewrite)
        flat = [q for qs in queries for q in qs]
        mode = self.config.mode
        vectors = self.index.embed(flat) if mode in ("hybrid", "vector") else None
        n = max(k, self.config.candidates)
        results, pos = [], 0
        for qs in queries:
            rankings, weights = [], []
            for q in qs:
                if vectors is not None:
                    rankings.append(self.index.vector_search(vectors[pos], n))
                    weights.append(self.config.vector_weight)
                if mode in ("hybrid", "bm25"):
                    rankings.append(self.index.text_search(q, n))
                    weights.append(self.config.bm25_weight)
                pos += 1
            if len(rankings) == 1:
                results.append(rankings[0][:k])
            else:
                results.append(rrf_fuse(rankings, weights, self.config.rrf_k)[:k])
        return results


def rewrite_queries(lm, questions: list[str], max_new_tokens: int = 32) -> list[str]:
    """The model's search query for each question (greedy; one line each)."""
    from ..models import chat_messages, chat_prompt, generate

    prompts = [chat_prompt(lm.tokenizer, chat_messages(q, system=REWRITE_SYSTEM)) for q in questions]
    return [g.text.strip().splitlines()[0].strip() if g.text.strip() else ""
            for g in generate(lm, prompts, max_new_tokens=max_new_tokens)]


# --------------------------------------------------------------------------------------------------
# Retrieval quality on its own
# --------------------------------------------------------------------------------------------------


def load_questions(bench_dir: Path | str) -> list[dict]:
    """The ``questions.jsonl`` of a benchmark folder (BENCHMARKS.md), checked for the fields recall needs."""
    path = Path(bench_dir) / "questions.jsonl"
    if not path.is_file():
        raise EngrainError(f"{path} does not exist.", hint="Pass a benchmark folder holding questions.jsonl "
                                                           "(layout in BENCHMARKS.md).")
    rows = []
    for lineno, row in read_jsonl(path, hint="Fix or delete that line."):
        if not isinstance(row.get("question"), str) or not isinstance(row.get("docs"), list) or not row["docs"]:
            raise EngrainError(f"{path}:{lineno}: needs a 'question' string and a non-empty 'docs' list.",
                               hint="See BENCHMARKS.md for the fields of a question.")
        rows.append(row)
    if not rows:
        raise EngrainError(f"{path} holds no questions.", hint="Add one JSON object per line.")
    return rows


def _doc_key(doc_id: str) -> str:
    # A document id is its path without extension; benchmark `docs` name files without extension too.
    return doc_id.rsplit("/", 1)[-1] if "/" in doc_id else doc_id


def retrieval_recall(ws: Workspace, questions: list[dict], k: int = 5, config: RagConfig | None = None,
                     lm=None, drafts: list[str] | None = None) -> dict:
    """Recall@k of gold documents: ``any`` = at least one gold document among the top-k chunks' documents,
    ``all`` = every gold document there; overall and by ``hops``. ``drafts``: see ``Retriever.retrieve``."""
    config = (config or RagConfig()).model_copy(update={"top_k": k})
    retriever = Retriever(ChunkIndex(ws, config), config, lm=lm)
    hits = retriever.retrieve([q["question"] for q in questions], k, drafts)
    groups: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    misses = []
    for q, found in zip(questions, hits):
        got = {d for h in found for d in (h.doc_id, _doc_key(h.doc_id))}
        gold = [str(d) for d in q["docs"]]
        any_hit, all_hit = any(g in got for g in gold), all(g in got for g in gold)
        groups["all"].append((any_hit, all_hit))
        groups[f"hops={q.get('hops', 1)}"].append((any_hit, all_hit))
        if not all_hit:
            misses.append({"id": q.get("id"), "missing": [g for g in gold if g not in got]})

    def rates(rows: list[tuple[bool, bool]]) -> dict:
        return {f"recall@{k}_any": sum(a for a, _ in rows) / len(rows),
                f"recall@{k}_all": sum(b for _, b in rows) / len(rows), "n": len(rows)}

    overall = rates(groups.pop("all"))
    return {**overall, "k": k, "mode": config.mode, "rewrite_query": config.rewrite_query,
            "chunks": len(retriever.index), "embedding_model": retriever.index.embedder.name,
            "by_hops": {key.split("=", 1)[1]: rates(rows) for key, rows in sorted(groups.items())},
            "misses": misses}

"""The relevance gate: a trained memory answers the questions about its documents, the base weights the rest.

Training writes the documents into the weights and wears away some of what the model knew
(``experiments/knowledge`` measures how much). Most questions a deployed model gets are not about the user's
documents, and for those the trained weights can only be worse than the base model's. The gate scores a question
by how much closer the embedding model finds it to the documents the memory learned than to general requests:
its best cosine similarity to any of their chunks minus its best similarity to any of the package's general
replay requests. A general question on a topic the documents also cover (a capital city, when the documents are
Wikipedia passages) is near a chunk and nearer still to some general request, so it stays with the base weights;
a question about the documents is nearer to them. The trained weights answer above a threshold.
``experiments/knowledge``'s gate-margin rows measure this score against the chunk similarity alone.

The threshold is calibrated from training data alone, never from evaluation questions: it lets through the share
``answer.gate_general_share`` of the package's general replay requests (``engrain/data/replay_prompts.txt``), and
is lowered when needed so that at most ``MAX_ITEMS_BELOW`` of the memory's own training questions would be refused.
A question about the documents sent to the base model is lost for sure, a general question sent to the trained
weights only sometimes, so the rule leans towards the memory.

A hybrid (``lora+rag``) takes its trained memory's gate: a question the gate refuses is answered closed-book by
the base model, since the chunks retrieved for it are far from it (this is retrieval's relevance cut-off).

The chunks' embeddings and the threshold are cached in the memory's folder (``gate.npz``) under a key made of the
learned documents' content hashes, so an update (new documents learned) builds a new gate.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import write_bytes
from ..workspace import Workspace

GATE_FILE = "gate.npz"
MAX_ITEMS_BELOW = 0.02  # share of the memory's training questions the threshold may refuse
CALIBRATION_ITEMS = 512  # training questions sampled for the calibration
RULE = "v2"  # part of the cache key: a changed rule rebuilds cached gates (v2: the margin over general requests)


@dataclass
class RelevanceGate:
    """Routes each question to the trained weights (True) or the base weights (False)."""

    embedder: str
    chunks: np.ndarray  # unit rows, one per chunk of the learned documents
    general: np.ndarray  # unit rows, one per general replay request
    threshold: float
    calibration: dict = field(default_factory=dict)

    def scores(self, texts: list[str]) -> np.ndarray:
        """Each text's best cosine similarity to a chunk of the learned documents minus its best similarity to a
        general request."""
        from ..rag.embeddings import load_embedder

        if not texts:
            return np.zeros(0, dtype=np.float32)
        return self.margins(load_embedder(self.embedder).encode(texts))

    def margins(self, vectors: np.ndarray, leave_out_general: bool = False) -> np.ndarray:
        """The score of each embedded text; ``leave_out_general`` when the texts are the general requests
        themselves (row i of ``vectors`` is request i), so that none is compared with itself."""
        vectors = vectors.astype(np.float32)
        near_docs = (vectors @ self.chunks.T.astype(np.float32)).max(axis=1)
        if not len(self.general):
            return near_docs
        general = vectors @ self.general.T.astype(np.float32)
        if leave_out_general:
            np.fill_diagonal(general, -1.0)
        return near_docs - general.max(axis=1)

    def routes(self, texts: list[str]) -> list[bool]:
        return [bool(s >= self.threshold) for s in self.scores(texts)]

    def describe(self) -> dict:
        return {"threshold": round(self.threshold, 4), "chunks": int(len(self.chunks)), "embedder": self.embedder,
                **self.calibration}


def route(gate: RelevanceGate, texts: list[str], ask_memory, ask_base, name: str) -> list:
    """Answers in ``texts`` order: ``ask_memory`` for the texts the gate admits, ``ask_base`` for the rest (each a
    function of a list of texts returning Answers); each Answer's meta names the weights that answered."""
    routes = gate.routes(texts)
    out: list = [None] * len(texts)
    for admitted, ask, weights in ((True, ask_memory, name), (False, ask_base, "base")):
        idx = [i for i, r in enumerate(routes) if r == admitted]
        if idx:
            for i, answer in zip(idx, ask([texts[i] for i in idx])):
                answer.meta["weights"] = weights
                out[i] = answer
    return out


def threshold_for(item_scores: np.ndarray, general_scores: np.ndarray, general_share: float) -> float:
    """The score above which ``general_share`` of the general requests fall, lowered to refuse at most
    ``MAX_ITEMS_BELOW`` of the training questions (no general requests: the training questions alone)."""
    candidates = []
    if len(general_scores):
        candidates.append(float(np.quantile(general_scores, 1.0 - general_share)))
    if len(item_scores):
        candidates.append(float(np.quantile(item_scores, MAX_ITEMS_BELOW)))
    return min(candidates) if candidates else -1.0


def relevance_gate(workspace: Workspace, folder: Path, meta: dict, general_share: float) -> RelevanceGate | None:
    """The gate of the memory in ``folder`` (from its cache, or built and cached); None when the memory has no
    learned documents whose chunks the workspace still holds (items written by hand, or a corpus removed)."""
    from ..config import load_config
    from ..rag.embeddings import embedding_model_name

    embedder = embedding_model_name(load_config(workspace.config_path).rag.embedding_model)
    learned = meta.get("learned_documents") or {}
    key = hashlib.sha256(json.dumps([RULE, embedder, general_share, sorted(learned.items())]).encode()).hexdigest()
    cached = _read(folder / GATE_FILE, key) if learned else None
    if cached is not None:  # the corpus is read only to build a gate
        return cached
    chunks = _learned_chunks(workspace, learned)
    if not chunks:
        return None
    gate = _build(workspace, embedder, chunks, learned, general_share)
    buf = io.BytesIO()
    meta_json = json.dumps({"key": key, "threshold": gate.threshold, "embedder": embedder,
                            "calibration": gate.calibration})
    np.savez(buf, chunks=gate.chunks, general=gate.general, meta=np.array(meta_json))
    try:
        write_bytes(folder / GATE_FILE, buf.getvalue())
    except OSError:  # a read-only memory folder: the gate is rebuilt next time, answers are the same
        pass
    return gate


def _learned_chunks(workspace: Workspace, learned: dict) -> list[str]:
    from ..corpus.schema import read_chunks

    if not learned or not workspace.chunks_path.is_file():
        return []
    return [c.text for c in read_chunks(workspace) if c.doc_id in learned]


def _read(path: Path, key: str) -> RelevanceGate | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("key") != key:
                return None
            return RelevanceGate(meta["embedder"], data["chunks"], data["general"], float(meta["threshold"]),
                                 meta["calibration"])
    except (OSError, ValueError, KeyError):  # a torn or foreign file: build it again
        return None


def _build(workspace: Workspace, embedder: str, chunks: list[str], learned: dict,
           general_share: float) -> RelevanceGate:
    from ..rag.embeddings import load_embedder
    from ..train.replay import replay_prompts

    model = load_embedder(embedder)
    general = replay_prompts()
    general_vectors = model.encode(general) if general else np.zeros((0, 1), dtype=np.float32)
    gate = RelevanceGate(embedder, model.encode(chunks).astype(np.float16), general_vectors.astype(np.float16), 0.0)
    questions = _training_questions(workspace, set(learned))
    item_scores = gate.scores(questions)
    general_scores = gate.margins(general_vectors, leave_out_general=True) if general else np.zeros(0)
    gate.threshold = threshold_for(item_scores, general_scores, general_share)
    gate.calibration = {
        "score": "nearest learned chunk minus nearest general request (cosine)",
        "calibrated_on": f"{len(questions)} training questions, {len(general)} general replay requests",
        "training_questions_refused": round(float((item_scores < gate.threshold).mean()), 4) if len(questions) else None,
        "general_requests_admitted": round(float((general_scores >= gate.threshold).mean()), 4) if general else None,
    }
    return gate


def _training_questions(workspace: Workspace, docs: set[str]) -> list[str]:
    """A fixed sample of the user turns of the synthetic items made from the learned documents."""
    from ..errors import EngrainError
    from ..train.data import read_synthetic

    try:
        items = read_synthetic(workspace)
    except EngrainError:
        return []
    out = [m["content"] for _, item in items if set(item.get("doc_ids") or []) & docs
           for m in (item.get("messages") or [])[:2] if m.get("role") == "user"]
    return random.Random(0).sample(out, min(CALIBRATION_ITEMS, len(out)))

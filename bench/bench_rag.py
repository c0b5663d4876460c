"""Retrieval speed and scale, and end-to-end answering cost of context vs rag.

    python bench/bench_rag.py [--scales 1000,10000,100000] [--queries 40] [--embed-chunks 128] [--skip-e2e]

1. Indexing: --embed-chunks generated chunks (~120 words each) embedded with the embedded MiniLM and written
   through the real index path (LanceDB table + BM25 index): chunks/s for embedding and for the whole write.
2. Scale: at each scale N, N generated chunks are indexed with the real write path (LanceDB, FTS, and the
   IVF_SQ vector index from RagConfig.ann_min_rows on). Their vectors are NOT all computed by MiniLM (100k
   chunks would take hours on 2 cores): the --embed-chunks real MiniLM vectors from step 1 are reused, each
   copy with Gaussian noise (sigma 0.02 per dimension) and re-normalised, so neighbourhoods look like
   real embedding clusters. Queries are the example corpus's real questions, embedded by MiniLM once
   (query embedding time is reported on its own). Per query: vector search, BM25 search, and hybrid (both +
   RRF fusion) latency, p50/p95. For ANN scales the top-10 overlap with exact brute-force search is reported.
3. End to end on the example corpus with the embedded model: context (KV-prefix reuse, batched) and rag
   (top 4, hybrid) answering the same questions: seconds per question (batched, amortised) and prompt tokens.

Writes bench/out/rag.json. Timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from engrain.config import RagConfig  # noqa: E402
from engrain.corpus.schema import Chunk  # noqa: E402
from engrain.rag.embeddings import load_embedder
from engrain.rag.index import ChunkIndex, write_index
from engrain.rag.retrieval import rrf_fuse
from engrain.workspace import Workspace  # noqa: E402

EXAMPLE = ROOT / "examples" / "acme"


def vocabulary() -> list[str]:
    words = set()
    for path in (EXAMPLE / "docs").glob("*"):
        if path.suffix in (".md", ".txt", ".html"):
            words.update(w.lower() for w in re.findall(r"[A-Za-z]{3,}", path.read_text(errors="ignore")))
    rng = random.Random(1)
    syll = "ka lo mi ren tor va shi pel dun ar est ion ber qua zen fol ti mar os ul".split()
    words.update("".join(rng.choice(syll) for _ in range(rng.randint(2, 4))) for _ in range(20000))
    return sorted(words)


def make_chunks(n: int, vocab: list[str], seed: int = 0) -> list[Chunk]:
    rng = random.Random(seed)
    # Zipf-like word frequencies, as in real text: BM25 postings are then realistically skewed.
    weights = [1.0 / (i + 10) for i in range(len(vocab))]
    rng.shuffle(weights)
    cum = list(itertools.accumulate(weights))
    out = []
    for i in range(n):
        text = " ".join(rng.choices(vocab, cum_weights=cum, k=120)) + "."
        out.append(Chunk(id=f"gen-{i:06d}-0", doc_id=f"gen-{i:06d}", text=text, start=0, end=len(text),
                         sha256=hashlib.sha256(text.encode()).hexdigest()))
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q))


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1000, out


def bench_scale(n: int, base_vecs: np.ndarray, vocab: list[str], qtexts: list[str], qvecs: np.ndarray,
                embedder, tmp: Path) -> dict:
    rng = np.random.default_rng(n)
    chunks = make_chunks(n, vocab, seed=n)
    vecs = base_vecs[np.arange(n) % len(base_vecs)] + rng.normal(0, 0.02, (n, base_vecs.shape[1])).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ws = Workspace.at(tmp / f"scale-{n}")
    t0 = time.perf_counter()
    summary = write_index(ws, chunks, embedder, RagConfig(), vectors=vecs)
    build_s = time.perf_counter() - t0
    index = ChunkIndex(ws)
    k, cand = 10, 20
    lat = {"vector": [], "bm25": [], "hybrid": []}
    overlap = []
    for _ in range(2):  # first pass warms caches; only the second is kept
        for key in lat:
            lat[key].clear()
        overlap.clear()
        for text, vec in zip(qtexts, qvecs):
            ms_v, vhits = timed(lambda: index.vector_search(vec, cand))
            ms_b, bhits = timed(lambda: index.text_search(text, cand))
            ms_h, _ = timed(lambda: rrf_fuse([index.vector_search(vec, cand), index.text_search(text, cand)])[:k])
            lat["vector"].append(ms_v)
            lat["bm25"].append(ms_b)
            lat["hybrid"].append(ms_h)
            exact = set(np.argsort(-(vecs @ vec))[:k].tolist())
            overlap.append(len(exact & {int(h.chunk_id[4:10]) for h in vhits[:k]}) / k)
    row = {"chunks": n, "build_s": build_s, "ann": summary.ann, "ann_top10_overlap_with_exact": float(np.mean(overlap))}
    for key, xs in lat.items():
        row[f"{key}_p50_ms"], row[f"{key}_p95_ms"] = pct(xs, 50), pct(xs, 95)
    return row


def e2e(questions: list[str], tmp: Path, batch: int, max_new_tokens: int) -> dict:
    from engrain.corpus.ingest import ingest
    from engrain.rag.index import build_index
    from engrain.memory.context import ContextMemory
    from engrain.memory.rag import RagMemory
    from engrain.models import load_model

    ws = Workspace.at(tmp / "acme")
    ingest(EXAMPLE / "docs", ws)
    build_index(ws)
    lm = load_model(None, device="cpu")
    out = {}
    for name, mem in (("context", ContextMemory(ws, lm, batch_size=batch)),
                      ("rag", RagMemory(ws, lm, RagConfig(top_k=4), batch_size=batch))):
        t0 = time.perf_counter()
        answers = mem.answer(questions, max_new_tokens=max_new_tokens)
        s = time.perf_counter() - t0
        out[name] = {"s_per_question": s / len(questions), "prompt_tokens_mean": statistics.mean(
            a.prompt_tokens for a in answers), "answers": [a.text for a in answers]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="1000,10000,100000")
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--embed-chunks", type=int, default=128)
    ap.add_argument("--e2e-questions", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args()

    questions = [json.loads(x)["question"] for x in (EXAMPLE / "questions.jsonl").read_text().splitlines() if x]
    vocab = vocabulary()
    embedder = load_embedder(None)
    result: dict = {"embedding_model": embedder.name, "dim": embedder.dim}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        chunks = make_chunks(args.embed_chunks, vocab, seed=7)
        embedder.encode([c.text for c in chunks[:8]])  # warm-up
        t0 = time.perf_counter()
        summary = write_index(Workspace.at(tmp / "embed"), chunks, embedder)
        total = time.perf_counter() - t0
        result["indexing"] = {"chunks": len(chunks), "words_per_chunk": 120,
                              "embed_chunks_per_s": summary.chunks_per_s, "index_chunks_per_s": len(chunks) / total}
        base = ChunkIndex(Workspace.at(tmp / "embed")).table.to_arrow()
        base_vecs = np.stack(base.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
        qtexts = questions[:args.queries]
        t0 = time.perf_counter()
        qvecs = embedder.encode(qtexts, batch_size=1)
        result["query_embed_ms"] = (time.perf_counter() - t0) * 1000 / len(qtexts)
        result["scales"] = []
        for n in [int(s) for s in args.scales.split(",")]:
            print(f"[scale {n}] indexing and querying ...", file=sys.stderr, flush=True)
            result["scales"].append(bench_scale(n, base_vecs, vocab, qtexts, qvecs, embedder, tmp))
        if not args.skip_e2e:
            print("[e2e] context vs rag on the example corpus ...", file=sys.stderr, flush=True)
            result["e2e"] = e2e(questions[:args.e2e_questions], tmp, 4, args.max_new_tokens)

    ix = result["indexing"]
    print(f"\nindexing {ix['chunks']} chunks of ~120 words: embedding {ix['embed_chunks_per_s']:.1f} chunks/s, "
          f"whole index write {ix['index_chunks_per_s']:.1f} chunks/s; query embedding {result['query_embed_ms']:.0f} "
          "ms/query")
    print(f"{'chunks':>8} {'build s':>8} {'ann':>5} {'vec p50':>8} {'vec p95':>8} {'bm25 p50':>9} {'bm25 p95':>9} "
          f"{'hyb p50':>8} {'hyb p95':>8} {'top10 vs exact':>15}")
    for r in result["scales"]:
        print(f"{r['chunks']:>8} {r['build_s']:>8.1f} {str(r['ann']):>5} {r['vector_p50_ms']:>8.1f} "
              f"{r['vector_p95_ms']:>8.1f} {r['bm25_p50_ms']:>9.1f} {r['bm25_p95_ms']:>9.1f} {r['hybrid_p50_ms']:>8.1f} "
              f"{r['hybrid_p95_ms']:>8.1f} {r['ann_top10_overlap_with_exact']:>15.2f}")
    if "e2e" in result:
        c, r = result["e2e"]["context"], result["e2e"]["rag"]
        print(f"\nend to end ({args.e2e_questions} questions, batch 4): context {c['s_per_question']:.1f} s/question, "
              f"{c['prompt_tokens_mean']:.0f} prompt tokens; rag {r['s_per_question']:.1f} s/question, "
              f"{r['prompt_tokens_mean']:.0f} prompt tokens; context/rag time {c['s_per_question'] / r['s_per_question']:.1f}x, "
              f"prompt tokens {c['prompt_tokens_mean'] / r['prompt_tokens_mean']:.1f}x")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "rag.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'rag.json'}")


if __name__ == "__main__":
    main()

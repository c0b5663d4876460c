"""Recall of the gold documents when each question is searched alone, against the question fused with a draft: the
answer a method gave without those chunks in an earlier run's results.json (rag.draft_query searches the same way
with drafts made on the spot). A retrieval measure only: no model runs here.

    python experiments/retrieval/draft_recall.py WS BENCH --answers RESULTS.json [RESULTS.json ...] \
        --methods base,lora --k 3 --out OUT.json

WS is a workspace of BENCH's documents; one without an index gets BENCH/docs ingested and indexed with its
engrain.yaml (the defaults when it has none). The answers of several results.json (slices of one benchmark) are
joined by question id.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engrain.atomic import write_json
from engrain.config import load_config
from engrain.corpus.ingest import ingest
from engrain.evaluate.metrics import mcnemar_p
from engrain.evaluate.paired import joined_answers, load_results
from engrain.rag.index import build_index
from engrain.rag.retrieval import load_questions, retrieval_recall
from engrain.workspace import Workspace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ws")
    ap.add_argument("bench")
    ap.add_argument("--answers", nargs="+", required=True)
    ap.add_argument("--methods", default="base,lora")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    ws = Workspace.at(Path(args.ws)).ensure()
    settings = load_config(ws.config_path)
    config = settings.rag
    if not ws.index_dir.is_dir():
        ingest(Path(args.bench) / "docs", ws, settings.ingest)
        build_index(ws, config)
    questions = load_questions(args.bench)
    answers = joined_answers([(path, load_results(Path(path))) for path in args.answers])
    runs = {"question": retrieval_recall(ws, questions, args.k, config)}
    for method in args.methods.split(","):
        drafts = [answers[method].get(q["id"], "") for q in questions]
        runs[f"question+{method} draft"] = retrieval_recall(ws, questions, args.k, config, drafts=drafts)
    alone = {m["id"] for m in runs["question"]["misses"]}
    for name, r in runs.items():
        missed = {m["id"] for m in r["misses"]}  # questions whose gold documents were not all found
        r["all_found_won_lost"] = [len(alone - missed), len(missed - alone)]
        r["mcnemar_p"] = mcnemar_p(*r["all_found_won_lost"])
        hops = " | ".join(f"{h}-hop all {v[f'recall@{args.k}_all']:.3f} (n={v['n']})" for h, v in r["by_hops"].items())
        print(f"{name:24s} any {r[f'recall@{args.k}_any']:.3f} all {r[f'recall@{args.k}_all']:.3f} | {hops} | "
              f"won / lost {r['all_found_won_lost'][0]} / {r['all_found_won_lost'][1]}, p={r['mcnemar_p']:.2g}")
    write_json(Path(args.out), {"bench": Path(args.bench).name, "k": args.k, "answers": args.answers,
                                "rag": config.model_dump(), "runs": runs})


if __name__ == "__main__":
    main()

"""Coverage against binding: does a trained memory miss a benchmark's questions because their facts were never
asked in training, or because it learned them only in the words training asked them?

    python experiments/knowledge/wording_gap.py WS BENCH RESULTS [--memory lora] [--out FILE]

For each question of BENCH, the facts strategy's wh-questions in WS/synth whose answer (the statement) holds a gold
answer, asked about that answer (it is not in the question), are the fact "asked in training"; a gold answer found
only in other items is "stated"; found in none, "absent". The memory answered the benchmark's own wording in
RESULTS (its `engrain compare` run on WS); here its trained weights are asked the first trained wording of each asked
fact, closed-book as `engrain compare` asks but without the relevance gate (which sends a few questions to the base
weights), and the two wordings are paired on the same facts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engrain.evaluate import metrics
from engrain.evaluate.bench import load_bench
from engrain.memory.base import ClosedBook
from engrain.memory.parametric import TrainedMemory
from engrain.models import load_model
from engrain.synth.store import read_items
from engrain.workspace import Workspace


def normalised(items: list[dict]) -> list[tuple[str, str, str | None]]:
    """Per synthetic item: (its question or text, its answer, both normalised as `metrics.contains` compares them)
    and, for the facts strategy's wh-questions, the question as asked."""
    out = []
    for item in items:
        if "messages" not in item:
            out.append((metrics.normalize(item.get("text", "")), "", None))
            continue
        question, answer = item["messages"][0]["content"], item["messages"][1]["content"]
        wh = question if str(item.get("variant", "")).startswith("h") else None
        out.append((metrics.normalize(question), metrics.normalize(answer), wh))
    return out


def trained_wording(items: list[tuple[str, str, str | None]], answers: list[str]) -> tuple[str, str | None]:
    """("asked", the first wh-question about a gold answer), ("stated", None) or ("absent", None); ``items`` as
    ``normalised`` gives them."""
    golds = [g for g in map(metrics.normalize, answers) if g]

    def holds(text: str) -> bool:
        return any(g in text for g in golds)

    stated = False
    for question, answer, wh in items:
        if wh is not None and holds(answer) and not holds(question):
            return "asked", wh
        stated = stated or holds(question) or holds(answer)
    return ("stated" if stated else "absent"), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace")
    parser.add_argument("bench")
    parser.add_argument("results")
    parser.add_argument("--memory", default="lora")
    parser.add_argument("--out")
    args = parser.parse_args()
    ws = Workspace.at(args.workspace)
    items = normalised(read_items(ws.synth_dir))
    questions = load_bench(Path(args.bench)).questions
    theirs = {a["id"]: a["answer"] for a in json.loads(Path(args.results).read_text())["answers"][args.memory]}
    kinds = {q.id: trained_wording(items, q.answers) for q in questions}
    asked = [q for q in questions if kinds[q.id][0] == "asked"]
    memory = ClosedBook(TrainedMemory(args.memory, ws, load_model(None)).lm)
    ours = memory.answer([kinds[q.id][1] for q in asked], max_new_tokens=48)
    own = [metrics.contains(a.text, q.answers) for q, a in zip(asked, ours)]
    people = [metrics.contains(theirs[q.id], q.answers) for q in asked]
    summary = {"questions": len(questions), "by_coverage": {}, "asked_facts": len(asked),
               "trained_wording": sum(own) / len(asked), "benchmark_wording": sum(people) / len(asked),
               "paired": metrics.paired_difference(own, people),
               "examples": [{"id": q.id, "benchmark": q.question, "trained": kinds[q.id][1], "answer": a.text,
                             "right": o} for q, a, o in zip(asked, ours, own)]}
    for kind in ("asked", "stated", "absent"):
        ids = [q for q in questions if kinds[q.id][0] == kind]
        right = sum(metrics.contains(theirs[q.id], q.answers) for q in ids)
        summary["by_coverage"][kind] = {"questions": len(ids), "answered": right}
    print(json.dumps({k: v for k, v in summary.items() if k != "examples"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()

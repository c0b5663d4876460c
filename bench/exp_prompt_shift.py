"""Does a trained memory answer a fact only in the words it was trained on? Minutes on a CPU.

    python bench/exp_prompt_shift.py --workspace W [--memory NAME] [--bench PATH] [--n 120]

The `facts` strategy writes, for a sentence of a document, the item "Complete the sentence about <subject>: <start>"
with the rest of the sentence as its answer. A verbatim (`mem`) probe of fictional-dev is the start of such a
sentence, and `engrain compare` asks it as "Complete the sentence with the missing words: "<start> ..."". This
finds the probes whose start is the start of a training item, and asks W's trained memory both ways, closed-book,
greedy: the item's own training prompt, and the benchmark's prompt. A memory that answers the first and not the
second holds the fact but reaches it only through the prompt it was trained on; one that answers neither did not
take the fact in. Diagnostic only: the probes are never trained on, and the prompts are the training items' own.
Items that may have been held out for validation are skipped, so every asked fact was trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--memory", default=None, help="folder under memories/ (default: the only one)")
    ap.add_argument("--bench", default=str(ROOT.parent / "shared" / "data" / "fictional-dev"))
    ap.add_argument("--n", type=int, default=120, help="probes asked (the first N that have a training item)")
    args = ap.parse_args()

    from engrain.config import load_config
    from engrain.evaluate.bench import load_bench
    from engrain.evaluate.compare import question_text
    from engrain.evaluate.metrics import contains
    from engrain.memory.registry import open_memory
    from engrain.models import load_model
    from engrain.synth.facts import completion_parts
    from engrain.train.data import is_validation, read_synthetic
    from engrain.workspace import Workspace

    ws = Workspace.at(Path(args.workspace))
    names = [p.name for p in sorted(ws.memories_dir.iterdir()) if p.is_dir()]
    name = args.memory or (names[0] if len(names) == 1 else sys.exit(f"{ws.memories_dir} holds {names}: pass --memory"))
    items = read_synthetic(ws)
    fraction = load_config(ws.config_path).train.val_fraction
    # start of sentence -> the training prompt that ends with it
    prompts: dict[str, str] = {}
    for key, item in items:
        parts = completion_parts(item["messages"][0]["content"]) if "messages" in item else None
        if parts and not is_validation(key, fraction):
            prompts.setdefault(parts[1].strip(), item["messages"][0]["content"])
    bench = load_bench(Path(args.bench))
    pairs = [(q, prompts[q.question.strip()]) for q in bench.questions
             if "mem" in q.tags and q.question.strip() in prompts][:args.n]
    if not pairs:
        sys.exit("no verbatim probe starts a training item here: is W a fictional-dev workspace with facts items?")

    memory = open_memory(name, ws, load_model(None, device="cpu", dtype="float32"))
    asked = {"training prompt": [p for _, p in pairs], "benchmark prompt": [question_text(q) for q, _ in pairs]}
    hits = {}
    for how, questions in asked.items():
        answers = memory.answer(questions, max_new_tokens=32)
        hits[how] = [int(contains(a.text, q.answers)) for (q, _), a in zip(pairs, answers)]
    both = sum(a and b for a, b in zip(*hits.values()))
    print(json.dumps({"workspace": str(ws.root), "memory": name, "probes": len(pairs),
                      **{how: sum(h) for how, h in hits.items()}, "both": both}))
    print("| memory | verbatim probes | right, asked in the training prompt | right, asked in the benchmark's | both |")
    print(f"|---|---|---|---|---|\n| {name} | {len(pairs)} | {sum(hits['training prompt'])} | "
          f"{sum(hits['benchmark prompt'])} | {both} |")


if __name__ == "__main__":
    main()

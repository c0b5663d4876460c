"""How sure is the distillation teacher of the training labels? Reads (or computes) a workspace's teacher targets.

    python bench/exp_distill_teacher.py --workspace W [--top-k 32]

For every training example of W's synthetic data with source chunks, the teacher (the base model with the chunks in
the rag prompt, engrain/train/distill.py) gives its top-k at each answer token. Printed per item kind (chat answers, text):
how often the label is the teacher's first choice, the mean probability it gives the label (0 outside its top k),
and how often the label is outside its top k; over all answer tokens, and at the answer's first and last tokens
alone. With train.distill = d, a share d of the loss pulls towards the teacher's distribution instead of the label:
a teacher unsure of the labels dilutes the target, and one that disagrees on the first token (a chat model that
would restate the question before answering) teaches the answer's form as well as its content.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()

    from engrain.train.distill import teacher_targets
    from engrain.models import load_model
    from engrain.train.data import IGNORE, encode_item, read_synthetic
    from engrain.workspace import Workspace

    ws = Workspace.at(Path(args.workspace))
    lm = load_model(args.model, device="cpu", dtype="float32")
    items = read_synthetic(ws)
    examples = [encode_item(lm.tokenizer, item, key) for key, item in items]
    targets = teacher_targets(ws, lm, examples, dict(items), args.top_k, IGNORE)
    kinds = {key: ("chat" if "messages" in item else "text") for key, item in items}
    stats: dict[tuple[str, str], list[float]] = {}
    for ex in examples:
        t = targets.get(ex.key)
        if t is None:
            continue
        labels = [x for x in ex.labels if x != IGNORE]
        for i, (label, ids, lps) in enumerate(zip(labels, t.ids, t.logprobs)):
            probs = dict(zip(ids, lps))
            where = ["all"] + (["first"] if i == 0 else []) + (["last"] if i == len(labels) - 1 else [])
            for w in where:
                s = stats.setdefault((kinds[ex.key], w), [0, 0, 0.0, 0])
                s[0] += 1
                s[1] += ids[0] == label
                s[2] += math.exp(probs[label]) if label in probs else 0.0
                s[3] += label not in probs
    print(f"teacher targets for {len(targets)} of {len(examples)} examples (top {args.top_k})")
    print("| items | answer tokens | label tokens | label is first choice | mean p(label) | label outside top k |\n"
          "|---|---|---|---|---|---|")
    for (kind, where), (n, top1, p, miss) in sorted(stats.items()):
        print(f"| {kind} | {where} | {n} | {top1 / n:.3f} | {p / n:.3f} | {miss / n:.3f} |")


if __name__ == "__main__":
    main()

"""What share of a workspace's training tokens `train.fact_weight` weighs: the loss tokens of the documents' items
that state a name, number or date their prompt does not hold, overall and for text items (statements, passages)
and chat items (questions) apart.

    python experiments/knowledge/fact_share.py WS [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engrain.models.load import load_tokenizer
from engrain.train.data import IGNORE, encode_item, read_synthetic
from engrain.workspace import Workspace


def fact_share(ws: Workspace) -> dict:
    tokenizer = load_tokenizer()
    counts = {"text": [0, 0], "chat": [0, 0]}  # kind -> [loss tokens, fact tokens]
    for key, item in read_synthetic(ws):
        ex = encode_item(tokenizer, item, key, fact_weight=2.0)  # any weight other than 1 marks the fact tokens
        scored = [w for label, w in zip(ex.labels, ex.weights) if label != IGNORE]
        kind = "chat" if "messages" in item else "text"
        counts[kind][0] += len(scored)
        counts[kind][1] += sum(1 for w in scored if w != 1.0)
    loss, facts = (sum(c[i] for c in counts.values()) for i in (0, 1))
    return {"loss_tokens": loss, "fact_tokens": facts, "share": round(facts / loss, 4),
            **{f"share_{kind}": round(f / n, 4) for kind, (n, f) in counts.items() if n}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = {"workspace": str(args.workspace), **fact_share(Workspace.at(args.workspace))}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

"""How evenly does the memory layer's lookup spread a corpus over its slots? Seconds on a CPU.

    python bench/exp_slot_reads.py [--workspace bench/out/ws-full-memory] [--tokens 8192] [--options JSON]

Attaches fresh memories (as `engrain train --memory memory_layer` does: query projections and keys random, input
statistics and IDF measured on the package's general text) to the embedded model, reads the first N tokens of a
workspace's chunks through it, and prints for each memory, with and without input standardisation, how many slots
the text read and what share of all reads went to the busiest 1% and 10% of slots (even spreading: about 1% and
10%). Concentrated reads mean different documents, and general text, share the same few value rows.
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
    ap.add_argument("--workspace", default=str(ROOT / "bench" / "out" / "ws-full-memory"))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--options", default='{"layers": "spread"}', help="train.options.memory_layer as JSON")
    args = ap.parse_args()

    import copy

    import torch

    from engrain import models
    from engrain.memory.memory_layer import MemoryLayerKind, count_reads, memories

    chunks_file = Path(args.workspace) / "corpus" / "chunks.jsonl"
    if not chunks_file.is_file():
        sys.exit(f"{chunks_file} is missing; run engrain ingest (or bench/exp_fictional.py) for that workspace first.")
    lm = models.load_model(None, device="cpu", dtype="float32")
    ids: list[int] = []
    with chunks_file.open(encoding="utf-8") as f:
        for line in f:
            ids += lm.tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            if len(ids) >= args.tokens:
                break
    ids = ids[:args.tokens]
    print(f"{len(ids)} corpus tokens from {chunks_file}")
    for standardize in (False, True):
        torch.manual_seed(0)  # the same random keys both times: only the standardisation differs
        options = {**json.loads(args.options), "standardize": standardize}
        model = MemoryLayerKind().attach(copy.deepcopy(lm.model), lm.tokenizer,
                                         {"options": {"memory_layer": options}}, None)
        mems = memories(model)
        count_reads(model, mems, ids)
        for m in mems:
            reads = m.reads.sort(descending=True).values
            total = float(reads.sum())
            print(f"standardize={str(standardize):5}  block {m.layer_idx:2}: {int((reads > 0).sum()):,} of {m.slots:,} "
                  f"slots read; busiest 1% take {float(reads[:m.slots // 100].sum()) / total:.1%} of reads, "
                  f"busiest 10% take {float(reads[:m.slots // 10].sum()) / total:.1%}")


if __name__ == "__main__":
    main()

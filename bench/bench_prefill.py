"""Prefill of the embedded model in the decode loop, its attention run in causal query blocks against one block of
all queries, alternately in one process on the same random prompts:

    python bench/bench_prefill.py          # prints a table, writes bench/out/prefill.json

Shapes: one 477-token prompt (a rag prompt's first token) and 16 prompts of 500 tokens (a batch of `engrain
compare`'s rag questions). Best of ``--repeats`` per form, so a noisy neighbour inflates both forms alike; the
logits of the two forms are compared too (they must agree: the same attention in another order).
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from engrain.models import fastgen, load_model

OUT = ROOT / "bench" / "out"


def prefill(model, ids: torch.Tensor) -> torch.Tensor:
    """The decode loop's own prefill of equal-length prompts (no padding); their last positions' logits."""
    return fastgen._prefill(model, ids.tolist(), list(range(len(ids))), 0, None, "cpu").logits


def best_of(model, ids: torch.Tensor, block: int, repeats: int) -> tuple[float, torch.Tensor]:
    fastgen.QUERY_BLOCK = block
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits = prefill(model, ids)
        times.append(time.perf_counter() - t0)
    return min(times), logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    blocked = fastgen.QUERY_BLOCK
    lm = load_model("embedded")
    model = fastgen.decoder(lm.model)
    print(f"{model.dtype}, {torch.get_num_threads()} threads, query block {blocked}")
    print("| prompts | one block (s) | query blocks (s) | speed-up | logits max diff |")
    print("| --- | --- | --- | --- | --- |")
    generator = torch.Generator().manual_seed(0)
    rows_out = []
    with torch.inference_mode():
        for rows, width in ((1, 477), (16, 500)):
            ids = torch.randint(100, 20000, (rows, width), generator=generator)
            prefill(model, ids)  # warm-up
            whole, ref = best_of(model, ids, 1 << 30, args.repeats)
            split, got = best_of(model, ids, blocked, args.repeats)
            diff = (ref - got).abs().max().item()
            print(f"| {rows} x {width} | {whole:.3f} | {split:.3f} | {whole / split:.2f}x | {diff:.3g} |")
            rows_out.append({"prompts": rows, "tokens": width, "one_block_s": whole, "query_blocks_s": split,
                             "logits_max_diff": diff})
    fastgen.QUERY_BLOCK = blocked
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "prefill.json").write_text(json.dumps(
        {"rows": rows_out, "query_block": blocked, "repeats": args.repeats, "dtype": str(model.dtype),
         "threads": torch.get_num_threads(), "cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
         "torch": torch.__version__}, indent=2))
    print(f"wrote {OUT / 'prefill.json'}")


if __name__ == "__main__":
    main()

"""A decode step as the server runs it: rows admitted to a continuous batch (``stream.Stream``), then steps timed,
two ways of reading the step alternately in one process on the same rows:

    python bench/bench_decode_step.py [--repeats 5] [--steps 16]

- the attention over the cache: the columns written so far (a slice of the cache's buffer, which a bf16 matmul
  copies first) against the whole buffer, its unwritten tail masked (``fastgen.WHOLE_CACHE_RATIO``);
- the output head: int8 rows (``decode_weights.Int8Linear``) against the bf16 weight packed for oneDNN
  (``packed_weights.PackedLinear``), where the CPU packs bf16 weights.

Shapes: 1, 4 and 8 rows of rag-sized prompts (about 560 tokens: four chunks and a question) and 8 rows of chat-sized
prompts (40 tokens), random tokens, the embedded model, 24 steps of room as ``engrain serve``'s 24-token answers
leave. ms per step, best of ``--repeats``; the greedy tokens of the forms are compared (the head's differ where int8
rounding changed an argmax). Prints a table and writes bench/out/decode_step.json.
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
from engrain.models import decode_weights, fastgen, load_model  # noqa: E402
from engrain.models.stream import Stream  # noqa: E402

OUT = ROOT / "bench" / "out"
SHAPES = (("rag", 1, 560), ("rag", 4, 560), ("rag", 8, 560), ("chat", 8, 40))


def steps(model, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    """Seconds per step over ``n`` steps of a stream holding ``prompts``, and each row's greedy tokens."""
    stream = Stream(model, pad_id=0)
    stream.admit(prompts, [n + 8] * len(prompts))
    tokens: dict[int, list[int]] = {}
    t0 = time.perf_counter()
    for _ in range(n):
        for handle, token in stream.step():
            tokens.setdefault(handle, []).append(token)
        stream.advance(set())
    return (time.perf_counter() - t0) / n, [tokens[h] for h in sorted(tokens)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    lm = load_model("embedded")
    model = fastgen.decoder(lm.model)
    weights = decode_weights.for_model(model)
    if weights is None or weights.packed is None:
        sys.exit("This CPU or build does not pack bf16 weights for oneDNN: the forms compared here do not apply.")
    packed_head = weights.head
    int8_head = decode_weights.quantize(model.lm_head.weight, model.dtype)
    ratio = fastgen.WHOLE_CACHE_RATIO
    forms = {"slice, int8 head": (0, int8_head), "whole cache, int8 head": (ratio, int8_head),
             "whole cache, packed head": (ratio, packed_head)}
    generator = torch.Generator().manual_seed(0)
    print(f"{model.dtype}, {torch.get_num_threads()} threads, decode weights {decode_weights.MAX_ROWS} rows")
    print("| prompts | rows | " + " | ".join(f"{f} (ms)" for f in forms) + " | slice / packed | tokens equal |")
    print("| --- | --- | " + " | ".join("---" for _ in forms) + " | --- | --- |")
    results = []
    with torch.inference_mode():
        for kind, rows, length in SHAPES:
            prompts = [torch.randint(100, 20000, (length + 7 * r,), generator=generator).tolist() for r in range(rows)]
            best = dict.fromkeys(forms, float("inf"))
            out = {}
            for _ in range(args.repeats):
                for name, (whole, head) in forms.items():
                    fastgen.WHOLE_CACHE_RATIO, weights.head = whole, head
                    seconds, out[name] = steps(lm.model, prompts, args.steps)
                    best[name] = min(best[name], seconds)
            names = list(forms)
            same = {f"{a} / {b}": out[a] == out[b] for a, b in zip(names, names[1:])}
            ms = {name: round(s * 1000, 2) for name, s in best.items()}
            print(f"| {kind} {length} | {rows} | " + " | ".join(f"{ms[n]:.1f}" for n in names)
                  + f" | {best[names[0]] / best[names[-1]]:.2f}x | "
                  + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in same.items()) + " |")
            results.append({"prompts": kind, "rows": rows, "tokens": length, "ms_per_step": ms, "tokens_equal": same})
    fastgen.WHOLE_CACHE_RATIO, weights.head = ratio, packed_head
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "decode_step.json").write_text(json.dumps(
        {"results": results, "steps": args.steps, "repeats": args.repeats, "dtype": str(model.dtype),
         "threads": torch.get_num_threads(), "cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
         "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    main()

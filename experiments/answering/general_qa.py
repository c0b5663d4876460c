"""The base model's answers to the 120 general questions (the forgetting probe) in each answering path, paired
question by question against the fp32 reference: does a faster path change general knowledge as measured?

    python experiments/answering/general_qa.py   # writes experiments/answering/results/general-qa/results.json
    python experiments/answering/general_qa.py --paths prompts-float32,prompts-int8,prompts-int8-all,\
prompts-int8-qkv-float32,prompts-int8-gate_up-float32 --out experiments/answering/results/general-qa-int8/results.json

Paths: float32 (the reference), bfloat16 with its own weights, bfloat16 decoding from int8 weights, from int4
weights (4-bit groups where the weights are 4-bit already, int8 rows elsewhere: the default on CPUs with native
bf16), and from int8 with the output head left in bf16 (not an engrain option: it asks how much of int8's
difference is the head's). The ``prompts-`` paths are the default bf16 path with its prompts' products packed in
fp32 or in int8 (``model.prefill_dtype``, which keeps the down projections in fp32), and, not engrain options, int8
for every projection and int8 for all but one other kind: which of them carries int8's difference? The first path
named is the reference. No training: the embedded model as loaded.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from engrain.atomic import write_text
from engrain.evaluate import metrics
from engrain.evaluate.forgetting import general_questions
from engrain.memory.base import ClosedBook
from engrain.models import cpu_model, decode_weights, load_model, packed_weights

OUT = Path(__file__).resolve().parent / "results" / "general-qa" / "results.json"
# name: (model.dtype, model.decode_weights, model.prefill_dtype, the projection an int8 model keeps in fp32)
PATHS = {"float32": ("float32", "model", "auto", None), "bfloat16": ("bfloat16", "model", "auto", None),
         "bfloat16+int8": ("bfloat16", "int8", "auto", None), "bfloat16+int4": ("bfloat16", "int4", "auto", None),
         "bfloat16+int8, head bf16": ("bfloat16", "int8", "auto", None),
         "prompts-float32": ("auto", "auto", "float32", None), "prompts-int8": ("auto", "auto", "int8", None),
         "prompts-int8-all": ("auto", "auto", "int8", ()),
         **{f"prompts-int8-{kept}-float32": ("auto", "auto", "int8", (kept,)) for kept in ("qkv", "gate_up")}}
DEFAULT_PATHS = list(PATHS)[:5]


def without_int8_head(build):
    def wrapped(model, mode="int8"):
        weights = build(model, mode)
        weights.head = None  # the head then runs on the model's own weights
        return weights
    return wrapped


def with_float_products(build, kept: tuple[str, ...]):
    """``packed_weights.build`` keeping the ``kept`` projections of an int8 model in fp32 (its own choice,
    ``INT8_FLOAT_PRODUCTS``, otherwise)."""
    return lambda model, dtype=None: build(model, dtype, float_products=kept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", default=",".join(DEFAULT_PATHS), help="comma-separated, the reference first: "
                    + ", ".join(PATHS))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    names = args.paths.split(",")
    if unknown := [n for n in names if n not in PATHS]:
        raise SystemExit(f"unknown paths {unknown}; choose from {', '.join(PATHS)}")
    questions = general_questions()
    right = {}
    build, pack = decode_weights.build, packed_weights.build
    for name in names:
        dtype, decode, prefill, kept = PATHS[name]
        decode_weights.build = without_int8_head(build) if name.endswith("head bf16") else build
        packed_weights.build = with_float_products(pack, kept) if kept is not None else pack
        lm = load_model(None, device="cpu", dtype=dtype, decode_weights=decode, prefill_dtype=prefill)
        answers = ClosedBook(lm).answer([q.question for q in questions], max_new_tokens=32)
        right[name] = [float(metrics.contains(a.text, q.answers)) for q, a in zip(questions, answers)]
        print(name, sum(right[name]) / len(questions), flush=True)
    decode_weights.build, packed_weights.build = build, pack
    ref = right[names[0]]
    rows = {name: {"contains": sum(got) / len(got), f"vs_{names[0]}": metrics.paired_difference(got, ref)}
            for name, got in right.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps({"n_questions": len(questions), "max_new_tokens": 32, "paths": rows,
                                     "environment": {"torch": torch.__version__, "machine": platform.machine(),
                                                     "cpu": cpu_model(), "threads": torch.get_num_threads()}},
                                    indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

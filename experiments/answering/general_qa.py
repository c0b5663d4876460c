"""The base model's answers to the 120 general questions (the forgetting probe) in each answering path, paired
question by question against the fp32 reference: does a faster path change general knowledge as measured?

    python experiments/answering/general_qa.py   # writes experiments/answering/results/general-qa/results.json

Paths: float32 (the reference), bfloat16 with its own weights, bfloat16 decoding from int8 weights, from int4
weights (4-bit groups where the weights are 4-bit already, int8 rows elsewhere: the default on CPUs with native
bf16), and from int8 with the output head left in bf16 (not an engrain option: it asks how much of int8's
difference is the head's). No training: the embedded model as loaded.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from engrain.atomic import write_text
from engrain.evaluate import metrics
from engrain.evaluate.forgetting import general_questions
from engrain.memory.base import ClosedBook
from engrain.models import decode_weights, load_model

OUT = Path(__file__).resolve().parent / "results" / "general-qa" / "results.json"
PATHS = {"float32": ("float32", "model"), "bfloat16": ("bfloat16", "model"), "bfloat16+int8": ("bfloat16", "int8"),
         "bfloat16+int4": ("bfloat16", "int4"), "bfloat16+int8, head bf16": ("bfloat16", "int8")}


def without_int8_head(build):
    def wrapped(model, mode="int8"):
        weights = build(model, mode)
        weights.head = None  # the head then runs on the model's own weights
        return weights
    return wrapped


def main() -> None:
    questions = general_questions()
    right = {}
    build = decode_weights.build
    for name, (dtype, decode) in PATHS.items():
        decode_weights.build = without_int8_head(build) if name.endswith("head bf16") else build
        lm = load_model(None, device="cpu", dtype=dtype, decode_weights=decode)
        answers = ClosedBook(lm).answer([q.question for q in questions], max_new_tokens=32)
        right[name] = [float(metrics.contains(a.text, q.answers)) for q, a in zip(questions, answers)]
        print(name, sum(right[name]) / len(questions), flush=True)
    decode_weights.build = build
    ref = right["float32"]
    rows = {name: {"contains": sum(got) / len(got), "vs_float32": metrics.paired_difference(got, ref)}
            for name, got in right.items()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    write_text(OUT, json.dumps({"n_questions": len(questions), "max_new_tokens": 32, "paths": rows,
                                "environment": {"torch": torch.__version__, "machine": platform.machine(),
                                                "threads": torch.get_num_threads()}}, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

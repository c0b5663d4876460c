"""Full-context answering: KV-prefix reuse against recomputing the whole prompt for every question.

    python bench/bench_context.py [--questions 4] [--batch 4] [--max-new-tokens 24] [--corpus examples/acme]

Ingests the example corpus (~5.5k tokens: it fits SmolLM2's 8k window whole), loads the embedded model and
answers the same questions three ways, side by side in one run:
  recompute      the whole prompt (documents + question) run for each question, one at a time
  reuse-1        the documents' KV cache computed once; each question runs only its own tokens, one at a time
  reuse-batch    the same cache shared (as a broadcast view) by a batch of --batch questions
The recompute and reuse runs use identical token ids, so their greedy answers must match; the table says
whether they did. Writes bench/out/context.json. Timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from engrain.corpus.ingest import ingest  # noqa: E402
from engrain.memory.context import ContextMemory  # noqa: E402
from engrain.models import load_model  # noqa: E402
from engrain.workspace import Workspace  # noqa: E402


def run(mem: ContextMemory, questions: list[str], max_new_tokens: int) -> dict:
    t0 = time.perf_counter()
    answers = mem.answer(questions, max_new_tokens=max_new_tokens)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "per_question_s": seconds / len(questions), "answers": [a.text for a in answers],
            "prompt_tokens": [a.prompt_tokens for a in answers], "prefix_seconds": mem._prefix_seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=ROOT / "examples" / "acme")
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-context", type=int, default=None,
                    help="a smaller window than the model's (truncates the corpus): a quicker run")
    args = ap.parse_args()

    questions = [json.loads(line)["question"] for line in (args.corpus / "questions.jsonl").read_text().splitlines()
                 if line.strip()][:args.questions]
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.at(Path(tmp) / "ws")
        ingest(args.corpus / "docs", ws)
        lm = load_model(args.model, device="cpu")
        ways = {
            "recompute": ContextMemory(ws, lm, reuse_prefix=False, batch_size=1, max_context=args.max_context),
            "reuse-1": ContextMemory(ws, lm, reuse_prefix=True, batch_size=1, max_context=args.max_context),
            "reuse-batch": ContextMemory(ws, lm, reuse_prefix=True, batch_size=args.batch, max_context=args.max_context),
        }
        context_tokens = ways["recompute"].truncation["context_tokens"]
        results = {}
        for name, mem in ways.items():
            print(f"[{name}] answering {len(questions)} questions over {context_tokens} context tokens ...",
                  file=sys.stderr, flush=True)
            results[name] = run(mem, questions, args.max_new_tokens)

    base = results["recompute"]["per_question_s"]
    print(f"\ncontext: {context_tokens} tokens, {len(questions)} questions, {args.max_new_tokens} new tokens max, "
          f"model {lm.name}, cpu, batch {args.batch}")
    print(f"{'way':<12} {'total s':>8} {'s/question':>11} {'prefix s':>9} {'speed-up':>9} {'same answers':>13}")
    for name, r in results.items():
        same = sum(a == b for a, b in zip(r["answers"], results["recompute"]["answers"]))
        r["speedup_vs_recompute"] = base / r["per_question_s"]
        r["same_answers_as_recompute"] = same
        print(f"{name:<12} {r['seconds']:>8.1f} {r['per_question_s']:>11.2f} {r['prefix_seconds']:>9.1f} "
              f"{r['speedup_vs_recompute']:>8.1f}x {same:>6}/{len(questions)}")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "context.json").write_text(json.dumps({"context_tokens": context_tokens, "questions": questions,
                                                  "max_new_tokens": args.max_new_tokens, "batch": args.batch,
                                                  "model": lm.name, "results": results}, indent=2))
    print(f"wrote {out / 'context.json'}")


if __name__ == "__main__":
    main()

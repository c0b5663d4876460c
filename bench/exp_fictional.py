"""Which memory knows the documents? `engrain compare` on the first N documents of fictional-dev.

    python bench/exp_fictional.py [--docs 10] [--methods base,context,rag,lora,prefix,memory_layer]
                                  [--epochs 2] [--micro-batch 1] [--workspace bench/out/fictional-ws] [--bench PATH]
                                  [--dtype auto] [--out DIR] [--probe-form continuation|chat]

The benchmark (../shared/data/fictional-dev by default, BENCHMARKS.md layout) holds invented facts the base model
cannot know, asked as cloze probes (by default as raw continuation; see --probe-form). The workspace gets the
settings below before anything is built (recorded in WS/engrain.yaml and in results.json), then the comparison
runs exactly as `engrain compare BENCH --docs N` would: ingest, index, synthesis with the model-free `facts`
strategy (the questions are only the leak guard's exclusion list), one training run per memory, answers,
forgetting, leak check, report. Everything lands in bench/out/fictional-<N>docs/ (results.json, report.md,
report.html).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from engrain.config import load_config, save_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", default=str(ROOT.parent / "shared" / "data" / "fictional-dev"))
    ap.add_argument("--docs", type=int, default=10)
    ap.add_argument("--methods", default="base,context,rag,lora,prefix,memory_layer")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--facts-per-chunk", type=int, default=12)
    ap.add_argument("--micro-batch", type=int, default=1, help="rows of 1,024 tokens per step: 1 = more updates "
                                                                   "for the same compute")
    ap.add_argument("--latency-sample", type=int, default=3)
    ap.add_argument("--dtype", default="auto", help="of the answering model: auto (bf16 on a GPU), float32, ...")
    ap.add_argument("--out", default=None, help="report folder (default bench/out/fictional-<N>docs)")
    ap.add_argument("--workspace", default=str(ROOT / "bench" / "out" / "fictional-ws"))
    ap.add_argument("--probe-form", default="continuation", choices=["continuation", "chat"],
                    help="how cloze probes are asked: continuation (the sentence start as plain text, as the data sets "
                         "intend) or chat (an instruction in the chat template)")
    args = ap.parse_args()

    from engrain.cli import print_results
    from engrain.evaluate.run import parse_methods, run_compare
    from engrain.models import load_model
    from engrain.workspace import Workspace

    ws = Workspace.at(Path(args.workspace)).ensure()
    config = load_config(ws.config_path)
    config.ingest.chunk_tokens, config.ingest.chunk_overlap = 128, 16
    config.synth.strategies = ["facts"]
    config.synth.facts_per_chunk = args.facts_per_chunk
    config.train.epochs = args.epochs
    config.train.micro_batch = args.micro_batch
    save_config(config, ws.config_path)
    out = Path(args.out) if args.out else ROOT / "bench" / "out" / f"fictional-{args.docs}docs"
    results = run_compare(Path(args.bench), ws, parse_methods(args.methods), out, load_model(None, dtype=args.dtype),
                          docs=args.docs, latency_sample=args.latency_sample, probe_form=args.probe_form)
    print_results(results, out)
    print("| method | contains (95% CI) | " + " | ".join(f"tag {t}" for t in ("mem", "gen", "hard_gen"))
          + " | general QA after | build s |")
    print("|---|---|---|---|---|---|---|")
    for name, m in results["methods"].items():
        tags = " | ".join(f"{m['by_tag'].get(t, {}).get('contains', float('nan')):.3f}" for t in ("mem", "gen", "hard_gen"))
        f = m.get("forgetting") or {}
        general = f"{f['general_qa_after']:.3f} ({f['general_qa_delta']:+.3f})" if f else "-"
        lo, hi = m["contains_ci"]
        print(f"| {name} | {m['contains']:.3f} ({lo:.3f}-{hi:.3f}) | {tags} | {general} | {m['build_seconds']:.0f} |")


if __name__ == "__main__":
    main()

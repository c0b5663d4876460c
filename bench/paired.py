"""Methods from separate comparison runs, tested question by question against one reference.

    python bench/paired.py --bench PATH [--docs 10] --against OUT/results.json:base OUT2/results.json:memory ...

Each argument names a results.json and a method in it. Every run must have answered the same benchmark (same
--docs). Answers are rescored here from their text against the benchmark's gold answers, so results.json files
written before per-question scores were recorded work too. Prints, per method, contains with its 95% interval and
the paired difference to the reference: 95% paired bootstrap interval, questions won and lost, McNemar's exact p.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def scores(spec: str, questions: list) -> tuple[str, list[float]]:
    """``FILE:METHOD`` -> (label, contains per question in the benchmark's order)."""
    from engrain.evaluate import metrics

    path, _, method = spec.rpartition(":")
    results = json.loads(Path(path).read_text(encoding="utf-8"))
    answers = (results.get("answers") or {}).get(method)
    if answers is None:
        sys.exit(f"{path} has no answers for method {method!r} (it has: {', '.join(results.get('answers') or {})}).")
    by_id = {a["id"]: a["answer"] for a in answers}
    missing = [q.id for q in questions if q.id not in by_id]
    if missing:
        sys.exit(f"{path}:{method} did not answer {len(missing)} of the benchmark's questions (e.g. {missing[0]}); "
                 "was it run with the same --docs?")
    return f"{Path(path).parent.name}:{method}", [metrics.contains(by_id[q.id], q.answers) for q in questions]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", required=True)
    ap.add_argument("--docs", type=int, default=None)
    ap.add_argument("--against", required=True, help="FILE:METHOD every other method is compared with")
    ap.add_argument("runs", nargs="+", help="FILE:METHOD")
    args = ap.parse_args()

    from engrain.evaluate import metrics
    from engrain.evaluate.bench import load_bench
    from engrain.evaluate.report import fmt_paired

    bench = load_bench(Path(args.bench))
    questions = (bench.first_docs(args.docs) if args.docs else bench).questions
    ref_label, ref = scores(args.against, questions)
    print(f"{len(questions)} questions; reference {ref_label}: {sum(ref) / len(ref):.3f}")
    print("| method | contains (95% CI) | difference [95% paired CI] p | won / lost |")
    print("|---|---|---|---|")
    for spec in args.runs:
        label, own = scores(spec, questions)
        lo, hi = metrics.wilson_ci(sum(own), len(own))
        d = metrics.paired_difference(own, ref)
        print(f"| {label} | {sum(own) / len(own):.3f} ({lo:.3f}-{hi:.3f}) | {fmt_paired(d)} | {d['wins']} / {d['losses']} |")


if __name__ == "__main__":
    main()

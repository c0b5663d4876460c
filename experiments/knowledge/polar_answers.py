"""How each method answers the questions whose answer is yes or no, and what else it wins and loses against another.

    python experiments/knowledge/polar_answers.py BENCH RESULTS [RESULTS ...] [--method lora+rag --against rag]

For every method in the results (one run, a run joined by experiments/join_slices.py, or the slices' own runs given
one after the other, joined as join_slices.py joins them), prints how its answers to BENCH's yes/no questions begin
(Yes, No, anything else) and how many it gets right, then the questions the method answers right and --against does
not, and the other way round, split into yes/no questions and the rest, per tag (bridge, comparison, ...). A trained
memory's items answer every question with a statement, so this shows whether it still answers a yes/no question
with yes or no.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from engrain.errors import EngrainError
from engrain.evaluate import metrics
from engrain.evaluate.paired import bench_questions, joined_answers, load_results
from engrain.evaluate.report import fmt_paired

POLAR = ("yes", "no")


def opening(answer: str) -> str:
    """yes, no or other: the answer's first word, as a reader would take it."""
    words = answer.strip().lower().split()
    first = words[0].strip(".,!;:") if words else ""
    return first if first in POLAR else "other"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bench")
    parser.add_argument("results", nargs="+")
    parser.add_argument("--method", default="lora+rag")
    parser.add_argument("--against", default="rag")
    args = parser.parse_args()
    try:
        answers = joined_answers([(p, load_results(Path(p))) for p in args.results])
        first = next(iter(answers.values()))
        questions = [q for q in bench_questions(Path(args.bench)) if q.id in first]
    except EngrainError as e:
        raise SystemExit(str(e)) from e
    polar = [q for q in questions if any(a.strip().lower() in POLAR for a in q.answers)]
    polar_ids = {q.id for q in polar}
    print(f"{len(questions)} questions answered, {len(polar)} of them yes/no "
          f"({sum(q.answers[0].strip().lower() == 'yes' for q in polar)} yes)")
    print("| method | begins Yes | begins No | other | right |\n| --- | --- | --- | --- | --- |")
    for m in answers:
        begins = Counter(opening(answers[m][q.id]) for q in polar)
        right = sum(metrics.contains(answers[m][q.id], q.answers) > 0 for q in polar)
        print(f"| {m} | {begins['yes']} | {begins['no']} | {begins['other']} | {right} of {len(polar)} |")
    if args.method not in answers or args.against not in answers:
        return
    won, lost = Counter(), Counter()
    for q in questions:
        mine = metrics.contains(answers[args.method][q.id], q.answers) > 0
        theirs = metrics.contains(answers[args.against][q.id], q.answers) > 0
        for tag in q.tags or ["untagged"]:
            key = (tag, "yes/no" if q.id in polar_ids else "other")
            won[key] += mine and not theirs
            lost[key] += theirs and not mine
    print(f"\n{args.method} against {args.against}, questions won / lost:")
    for key in sorted(set(won) | set(lost)):
        print(f"  {key[0]}, {key[1]}: {won[key]} / {lost[key]}")
    for label, part in (("all", questions), ("all but the yes/no ones", [q for q in questions if q.id not in polar_ids])):
        d = metrics.paired_difference([metrics.contains(answers[args.method][q.id], q.answers) for q in part],
                                      [metrics.contains(answers[args.against][q.id], q.answers) for q in part])
        print(f"{label} ({len(part)}): {fmt_paired(d)} ({d['wins']} won / {d['losses']} lost)")


if __name__ == "__main__":
    main()

"""The general questions a trained memory answers differently from the base model, lost and gained.

    python experiments/knowledge/lost_answers.py WS [--memory lora] [--against OTHER_WS]

Asks the forgetting probe (engrain/data/general_qa.jsonl) of the base model and of WS's trained memory, closed-book,
as `engrain compare` measures forgetting, and prints every question one of them answers right and the other not,
with both answers: what the general-QA drop in a row's results is made of. With --against, OTHER_WS's memory is
asked too and the two memories are tested question by question (what `engrain paired general` does from results
recorded since comparisons keep the general answers).
"""

from __future__ import annotations

import argparse

from engrain.evaluate import metrics
from engrain.evaluate.forgetting import general_questions
from engrain.evaluate.report import fmt_paired
from engrain.memory.base import ClosedBook
from engrain.memory.parametric import TrainedMemory
from engrain.models import load_model
from engrain.workspace import Workspace


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workspace")
    parser.add_argument("--memory", default="lora")
    parser.add_argument("--against", help="another workspace whose memory is tested against WS's")
    args = parser.parse_args()
    lm = load_model(None)
    questions = general_questions()
    asked = [q.question for q in questions]
    base = ClosedBook(lm).answer(asked, max_new_tokens=32)
    trained = ClosedBook(TrainedMemory(args.memory, Workspace.at(args.workspace), lm).lm).answer(asked,
                                                                                                  max_new_tokens=32)
    for q, b, t in zip(questions, base, trained):
        right_before, right_after = metrics.contains(b.text, q.answers), metrics.contains(t.text, q.answers)
        if right_before != right_after:
            print(f"{'LOST' if right_before > right_after else 'GAINED'}: {q.question}\n"
                  f"  base:    {' '.join(b.text.split())[:100]}\n  trained: {' '.join(t.text.split())[:100]}")
    if args.against:
        other = ClosedBook(TrainedMemory(args.memory, Workspace.at(args.against), lm).lm).answer(asked,
                                                                                                max_new_tokens=32)
        mine = [metrics.contains(t.text, q.answers) for q, t in zip(questions, trained)]
        theirs = [metrics.contains(t.text, q.answers) for q, t in zip(questions, other)]
        d = metrics.paired_difference(mine, theirs)
        print(f"general QA {sum(mine) / len(mine):.3f} against {sum(theirs) / len(theirs):.3f}: {fmt_paired(d)} "
              f"({d['wins']} won / {d['losses']} lost)")


if __name__ == "__main__":
    main()

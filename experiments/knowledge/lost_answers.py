"""The general questions a trained memory answers differently from the base model, lost and gained.

    python experiments/knowledge/lost_answers.py WS [--memory lora]

Asks the forgetting probe (engrain/data/general_qa.jsonl) of the base model and of WS's trained memory, closed-book,
as `engrain compare` measures forgetting, and prints every question one of them answers right and the other not,
with both answers: what the general-QA drop in a row's results is made of.
"""

from __future__ import annotations

import argparse

from engrain.evaluate import metrics
from engrain.evaluate.forgetting import general_questions
from engrain.memory.base import ClosedBook
from engrain.memory.parametric import TrainedMemory
from engrain.models import load_model
from engrain.workspace import Workspace


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workspace")
    parser.add_argument("--memory", default="lora")
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


if __name__ == "__main__":
    main()

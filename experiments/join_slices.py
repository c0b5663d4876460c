"""Join the answers of runs made on disjoint slices of one benchmark, so that `engrain paired` tests them as one run
over all the slices' questions (the slices written by experiments/question_subset.py, e.g. hotpot-dev's questions 1
to 30 and 31 to 60, each trained and compared on its own).

    python experiments/join_slices.py OUT RESULTS [RESULTS ...]

OUT gets a results.json holding, per method every input answered, the answers of all inputs one after the other,
and the inputs it was joined from; nothing else of theirs (the scores are per slice, in each input). A question
answered in two inputs, or a method missing from one, is refused: the slices must not overlap. Then, for example:

    python experiments/question_subset.py ../shared/data/hotpot-dev 60 experiments/knowledge/ws/hotpot-dev-60q
    engrain paired experiments/knowledge/ws/hotpot-dev-60q OUT/results.json:lora+rag --against OUT/results.json:rag
"""

from __future__ import annotations

import sys
from pathlib import Path

from engrain.atomic import write_json
from engrain.errors import EngrainError
from engrain.evaluate.paired import answers_of, load_results


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    out, inputs = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    try:
        runs = [load_results(p) for p in inputs]
    except EngrainError as e:
        sys.exit(str(e))
    methods = [m for m in runs[0].get("answers", {}) if all(m in r.get("answers", {}) for r in runs)]
    if not methods:
        sys.exit("the inputs share no method's answers")
    answers: dict[str, list] = {}
    for method in methods:
        seen: set[str] = set()
        answers[method] = []
        for path, run in zip(inputs, runs):
            for qid, text in answers_of(run, method, str(path)).items():
                if qid in seen:
                    sys.exit(f"{path} answers {qid} again: the slices overlap")
                seen.add(qid)
                answers[method].append({"id": qid, "answer": text})
    write_json(out / "results.json", {"joined_from": [str(p) for p in inputs],
                                      "benches": [r.get("bench") for r in runs], "answers": answers})
    print(f"wrote {out / 'results.json'}: {', '.join(methods)}, {len(answers[methods[0]])} answers each")


if __name__ == "__main__":
    main()

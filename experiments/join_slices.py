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
from engrain.evaluate.paired import joined_answers, load_results


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    out, inputs = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    try:
        runs = [(str(p), load_results(p)) for p in inputs]
        joined = joined_answers(runs)
    except EngrainError as e:
        sys.exit(str(e))
    answers = {m: [{"id": qid, "answer": text} for qid, text in by_id.items()] for m, by_id in joined.items()}
    write_json(out / "results.json", {"joined_from": [where for where, _ in runs],
                                      "benches": [r.get("bench") for _, r in runs],
                                      "answers": answers})
    print(f"wrote {out / 'results.json'}: {', '.join(answers)}, {len(next(iter(joined.values())))} answers each")


if __name__ == "__main__":
    main()

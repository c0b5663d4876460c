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

import json
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    out, inputs = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    runs = [json.loads(p.read_text(encoding="utf-8")) for p in inputs]
    methods = [m for m in runs[0].get("answers", {}) if all(m in r.get("answers", {}) for r in runs)]
    if not methods:
        sys.exit("the inputs share no method's answers")
    answers: dict[str, list] = {}
    for method in methods:
        seen: set[str] = set()
        answers[method] = []
        for path, run in zip(inputs, runs):
            for a in run["answers"][method]:
                if a["id"] in seen:
                    sys.exit(f"{path} answers {a['id']} again: the slices overlap")
                seen.add(a["id"])
                answers[method].append({"id": a["id"], "answer": a["answer"]})
    out.mkdir(parents=True, exist_ok=True)
    joined = {"joined_from": [str(p) for p in inputs],
              "benches": [r.get("bench") for r in runs], "answers": answers}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(joined, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out / "results.json")
    print(f"wrote {out / 'results.json'}: {', '.join(methods)}, {len(answers[methods[0]])} answers each")


if __name__ == "__main__":
    main()

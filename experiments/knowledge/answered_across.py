"""How the questions answered spread over several runs: how many questions exactly k of the runs answer, for each k,
and how many at least one does. Runs of one setting on different seeds that share a core and differ at the margin
hold many facts only weakly.

    python experiments/knowledge/answered_across.py RESULTS.json:METHOD [RESULTS.json:METHOD ...]
"""

from __future__ import annotations

import argparse
from collections import Counter

from engrain.errors import EngrainError
from engrain.evaluate.paired import answers_of, load_results, split_spec


def answered(spec: str) -> set[str]:
    """Ids of the questions one run answered (a gold answer contained in its answer, as results.json scored it)."""
    path, method = split_spec(spec)
    results = load_results(path)
    answers_of(results, method, str(path))  # a run without that method: the clear error `engrain paired` gives
    return {a["id"] for a in results["answers"][method] if a["contains"] > 0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", help="RESULTS.json:METHOD")
    args = parser.parse_args()
    try:
        runs = [answered(spec) for spec in args.runs]
    except EngrainError as exc:
        raise SystemExit(str(exc)) from None  # the message names the file and what it has
    by_count = Counter(Counter(q for run in runs for q in run).values())
    print("answered per run:", ", ".join(str(len(run)) for run in runs))
    for k in range(len(runs), 0, -1):
        print(f"answered by exactly {k} of {len(runs)} runs: {by_count.get(k, 0)}")
    print("answered by at least one:", len(set().union(*runs)))


if __name__ == "__main__":
    main()

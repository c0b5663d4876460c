"""Which step `train.keep_best` kept, for every trained memory in committed results.

    python experiments/knowledge/kept_steps.py [RESULTS_DIR] [--before 0.8]

Reads each results.json under RESULTS_DIR (default experiments/knowledge/results) whose trained memories record the
step kept (`describe.kept_weights_of_step`; older results do not), prints those kept before the given share of
their steps with the held-out facts they answered, and counts them by the part of the run's name before its first
"-" (squad10, fictional10, ...): whether the choice of checkpoint moves off the last steps, and where.

Memories trained since `train.keep_best_p` also record `best_over_last`, the held-out questions answered by the best
evaluation alone and by the last alone: for those it prints the evaluations' best step (the one kept without
`keep_best_p`; results older than `describe.best_val_step` leave it to the run's train-log.jsonl), that split, its
McNemar p and the step kept.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from engrain.evaluate.metrics import mcnemar_p


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="?", default="experiments/knowledge/results")
    parser.add_argument("--before", type=float, default=0.8, help="share of the steps a kept step counts as early")
    args = parser.parse_args()
    recorded, early = Counter(), Counter()
    for path in sorted(Path(args.results).glob("*/results.json")):
        run = path.parent.name
        for method, result in json.loads(path.read_text()).get("methods", {}).items():
            described = result.get("describe") or {}
            kept, steps = described.get("kept_weights_of_step"), described.get("steps")
            if not kept or not steps:
                continue
            if described.get("best_over_last") is not None:
                won, lost = described["best_over_last"]
                best = described.get("best_val_step", "(see train-log.jsonl)")
                print(f"{run} {method}: best evaluation step {best} answered {won} "
                      f"held-out questions the last did not, the last {lost} (McNemar p={mcnemar_p(won, lost):.2g}); "
                      f"step {kept} of {steps} kept")
            bench = run.split("-")[0]
            recorded[bench] += 1
            if kept < args.before * steps:
                early[bench] += 1
                print(f"{run} {method}: step {kept} of {steps} kept, held-out facts answered "
                      f"{described.get('best_val_answered', float('nan')):.3f}")
    print(f"\n{sum(early.values())} of {sum(recorded.values())} trained memories kept a step before "
          f"{args.before:.0%} of their steps")
    for bench in sorted(recorded):
        print(f"  {bench}: {early[bench]} of {recorded[bench]}")


if __name__ == "__main__":
    main()

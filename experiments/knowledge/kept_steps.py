"""Which step `train.keep_best` kept, for every trained memory in committed results.

    python experiments/knowledge/kept_steps.py [RESULTS_DIR] [--before 0.8]

Reads each results.json under RESULTS_DIR (default experiments/knowledge/results) whose trained memories record the
step kept (`describe.kept_weights_of_step`; older results do not), prints those kept before the given share of
their steps with the held-out facts they answered, and counts them by the part of the run's name before its first
"-" (squad10, fictional10, ...): whether the choice of checkpoint moves off the last steps, and where.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


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

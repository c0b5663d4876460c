"""Where two training runs part: two train-log.jsonl files of the same settings, step by step.

    python experiments/knowledge/log_diff.py RESULTS_DIR_A RESULTS_DIR_B

Prints the first step whose training loss differs, the mean absolute difference of the loss over the steps both
logged (a step's loss can be near zero, so not relative), and each evaluation's held-out share and validation loss side by side. Two runs of one config and
seed are one draw each, not one draw twice, when their losses part: a seed pair's difference then holds the
run-to-run noise as well as the setting compared.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def records(results_dir: str) -> dict[int, dict]:
    path = Path(results_dir) / "train-log.jsonl"
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("a")
    parser.add_argument("b")
    args = parser.parse_args()
    a, b = records(args.a), records(args.b)
    steps = sorted(set(a) & set(b))
    parted = next((s for s in steps if a[s]["loss"] != b[s]["loss"]), None)
    print(f"{len(steps)} steps in both logs; first differing loss: "
          + (f"step {parted} ({a[parted]['loss']} against {b[parted]['loss']})" if parted else "none"))
    if steps:
        mean = sum(abs(a[s]["loss"] - b[s]["loss"]) for s in steps) / len(steps)
        print(f"mean absolute loss difference: {mean:.3g}")
    print("step  answered a / b  val loss a / b")
    for s in steps:
        if "val_loss" in a[s] and "val_loss" in b[s]:
            print(f"{s:>4}  {a[s].get('val_answered', float('nan')):.3f} / {b[s].get('val_answered', float('nan')):.3f}"
                  f"  {a[s]['val_loss']:.4f} / {b[s]['val_loss']:.4f}")


if __name__ == "__main__":
    main()

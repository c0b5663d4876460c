"""Rerun a committed experiment row: the command rows.yaml records, with its committed config.

    python experiments/run.py knowledge            # list the rows of experiments/knowledge
    python experiments/run.py knowledge 2          # run row 2 (as listed), printing the command first
    python experiments/run.py knowledge 2 --print  # only print it

A row may name a `prepare` command (a script under experiments/, e.g. one that derives a workspace from another
row's); it runs first. A `then` command (an analysis of the row's workspace) runs after it. The row's results.json
is rewritten in place; `python experiments/tables.py` then regenerates docs/results.md.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def rows(experiment: str) -> list[dict]:
    manifest = ROOT / "experiments" / experiment / "rows.yaml"
    if not manifest.is_file():
        sys.exit(f"no experiment '{experiment}' ({manifest} is missing); the folders under experiments/ are the choices")
    return yaml.safe_load(manifest.read_text(encoding="utf-8"))["rows"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("experiment", help="a folder under experiments/, e.g. knowledge")
    parser.add_argument("row", nargs="?", type=int, help="the row's number as listed")
    parser.add_argument("--print", action="store_true", help="print the command, run nothing")
    args = parser.parse_args()
    listed = rows(args.experiment)
    if args.row is None:
        for i, row in enumerate(listed, 1):
            print(f"{i}. {row['title']}")
        return
    if not 1 <= args.row <= len(listed):
        sys.exit(f"row {args.row} does not exist: {args.experiment} has rows 1-{len(listed)}")
    row = listed[args.row - 1]
    commands = [" ".join(row[key].split()) for key in ("prepare", "command", "then") if row.get(key)]
    print("\n".join(commands))
    if not args.print:
        for command in commands:
            if code := subprocess.call(shlex.split(command), cwd=ROOT):
                sys.exit(code)


if __name__ == "__main__":
    main()

"""Copy an experiment's workspace (corpus, index, synthetic data, trained memories, config) into a new folder, so
a row can answer with the same memories under other settings without retraining them.

    python experiments/copy_workspace.py SOURCE_WS DEST_WS

An existing DEST_WS is left as it is (a rerun keeps its answers' inputs); SOURCE_WS must hold a trained memory:
its row in experiments/knowledge builds it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

SKIP = ("reports", "checkpoints")  # answers and training checkpoints are not inputs of a new run


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    source, dest = Path(sys.argv[1]), Path(sys.argv[2])
    if dest.exists():
        print(f"{dest} exists; kept as it is")
        return
    if not any((source / "memories").glob("*/engrain_memory.json")):
        sys.exit(f"{source} holds no trained memory; run the experiments/knowledge row that builds it first")
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(*SKIP))
    print(f"copied {source} -> {dest}")


if __name__ == "__main__":
    main()

"""Write a benchmark of a benchmark's first N questions and only the documents they name, so a slice of a corpus
whose questions each need their own documents (hotpot-dev: two per question) costs what its questions need.
``engrain compare --docs N`` keeps the first N documents by path, which on such a corpus keeps few whole questions.

    python experiments/question_subset.py BENCH N DEST
    python experiments/question_subset.py BENCH FROM:TO DEST   # questions FROM+1 to TO (a Python slice)

DEST (in an experiment's ignored ws/ folder) gets docs/ and questions.jsonl; its name is the benchmark's name in
the results. An existing DEST is checked to hold the same questions and kept.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from engrain.errors import EngrainError
from engrain.evaluate.bench import doc_id, load_bench


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    source, dest = Path(sys.argv[1]), Path(sys.argv[3])
    first, _, last = sys.argv[2].rpartition(":")
    try:
        picked = slice(int(first or 0), int(last))
    except ValueError:
        sys.exit(f"N must be a number of questions or FROM:TO, not {sys.argv[2]!r}")
    try:
        bench = load_bench(source)  # every question checked, its documents among docs/
    except EngrainError as e:
        sys.exit(str(e))
    lines = [line for line in (source / "questions.jsonl").read_text().splitlines() if line.strip()][picked]
    if (dest / "questions.jsonl").exists():
        if (dest / "questions.jsonl").read_text().splitlines() != lines:
            sys.exit(f"{dest} holds other questions; remove it or pick another DEST")
        print(f"{dest} exists with the same {len(lines)} questions; kept")
        return
    wanted = {d for q in bench.questions[picked] for d in q.docs}
    files = [f for f in bench.files() if doc_id(f) in wanted]
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for f in files:
        (tmp / "docs" / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bench.docs_dir / f, tmp / "docs" / f)
    (tmp / "questions.jsonl").write_text("\n".join(lines) + "\n")
    tmp.rename(dest)  # whole or absent: a crash leaves only the .tmp folder, rebuilt on the next run
    print(f"wrote {dest}: {len(lines)} questions, {len(files)} documents")


if __name__ == "__main__":
    main()

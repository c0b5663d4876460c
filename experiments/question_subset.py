"""Write a benchmark of a benchmark's first N questions and only the documents they name, so a slice of a corpus
whose questions each need their own documents (hotpot-dev: two per question) costs what its questions need.
``engrain compare --docs N`` keeps the first N documents by path, which on such a corpus keeps few whole questions.

    python experiments/question_subset.py BENCH N DEST

DEST (in an experiment's ignored ws/ folder) gets docs/ and questions.jsonl; its name is the benchmark's name in
the results. An existing DEST is checked to hold the same questions and kept.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    bench, n, dest = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    lines = [line for line in (bench / "questions.jsonl").read_text().splitlines() if line.strip()][:n]
    if (dest / "questions.jsonl").exists():
        if (dest / "questions.jsonl").read_text().splitlines() != lines:
            sys.exit(f"{dest} holds other questions; remove it or pick another DEST")
        print(f"{dest} exists with the same {len(lines)} questions; kept")
        return
    docs = sorted({d for line in lines for d in json.loads(line)["docs"]})
    files = {p.relative_to(bench / "docs").with_suffix("").as_posix(): p for p in (bench / "docs").rglob("*")
             if p.is_file()}
    missing = [d for d in docs if d not in files]
    if missing:
        sys.exit(f"{bench / 'questions.jsonl'} names documents not under docs/: {missing}")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for d in docs:
        target = tmp / "docs" / files[d].relative_to(bench / "docs")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files[d], target)
    (tmp / "questions.jsonl").write_text("\n".join(lines) + "\n")
    tmp.rename(dest)  # whole or absent: a crash leaves only the .tmp folder, rebuilt on the next run
    print(f"wrote {dest}: {len(lines)} questions, {len(docs)} documents")


if __name__ == "__main__":
    main()

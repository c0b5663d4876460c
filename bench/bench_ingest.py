"""Ingest speed: a full run over a generated folder of mixed documents, then incremental re-runs.

    python bench/bench_ingest.py [--docs 2000] [--tokens-per-doc 1000] [--workers 2]

Generates DOCS documents (~tokens-per-doc tokens each; mostly .txt/.md/.html, some .docx/.pdf) in a temp
folder, then measures, in one process and one run:
  full       ingest into an empty workspace (pool of --workers parsing processes)
  full-1proc the same with one process, for the pool's ratio (skip with --no-single)
  noop       re-ingest with nothing changed
  incr-1%    re-ingest after touching 0.5% of the files (same bytes, new mtime) and editing another 0.5%
Prints a table and writes bench/out/ingest.json. Timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from engrain.config import IngestConfig  # noqa: E402
from engrain.corpus.chunking import load_tokenizer  # noqa: E402
from engrain.corpus.ingest import ingest  # noqa: E402
from engrain.workspace import Workspace  # noqa: E402

SYLLABLES = "ka lo mi ren tor va shi pel dun ar est ion ber qua zen fol ti mar os ul".split()
COMMON = ("the of and to in is was for on with as by at from that which were are has its station crew "
          "river council report year city north new").split()


def word(rng: random.Random) -> str:
    if rng.random() < 0.55:
        return rng.choice(COMMON)
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))


def sentence(rng: random.Random) -> str:
    words = [word(rng) for _ in range(rng.randint(8, 22))]
    if rng.random() < 0.3:
        words.insert(rng.randint(0, len(words)), str(rng.randint(2, 9999)))
    return " ".join(words).capitalize() + "."


def paragraphs(rng: random.Random, n_words: int) -> list[str]:
    out, count = [], 0
    while count < n_words:
        p = " ".join(sentence(rng) for _ in range(rng.randint(2, 6)))
        out.append(p)
        count += len(p.split())
    return out


def write_doc(folder: Path, i: int, rng: random.Random, n_words: int, kind: str | None = None) -> Path:
    kind = kind or rng.choices(["txt", "md", "html", "docx", "pdf"], weights=[35, 25, 30, 5, 5])[0]
    sub = folder / f"group{i % 20:02d}"
    sub.mkdir(exist_ok=True)
    paras = paragraphs(rng, n_words)
    path = sub / f"doc{i:05d}.{kind}"
    if kind == "txt":
        path.write_text("\n\n".join(paras), encoding="utf-8")
    elif kind == "md":
        lines = [f"# Document {i}"]
        for k, p in enumerate(paras):
            if k % 3 == 0:
                lines.append(f"## Section {k // 3 + 1}")
            lines.append(p)
        path.write_text("\n\n".join(lines), encoding="utf-8")
    elif kind == "html":
        body = "".join(f"<h2>Part {k}</h2>" * (k % 4 == 0) + f"<p>{p}</p>" for k, p in enumerate(paras))
        path.write_text(f"<html><head><title>Doc {i}</title><script>var x = {i};</script></head><body>"
                        f"<nav><a href='/'>Home</a> <a href='/a'>About</a></nav><main><h1>Doc {i}</h1>{body}</main>"
                        f"<footer>Copyright</footer></body></html>", encoding="utf-8")
    elif kind == "docx":
        import docx

        d = docx.Document()
        d.add_heading(f"Document {i}", level=1)
        for p in paras:
            d.add_paragraph(p)
        d.save(path)
    else:
        from fpdf import FPDF

        pdf = FPDF()
        pdf.add_page()
        pdf.set_font("Helvetica", size=10)
        for p in paras:
            pdf.multi_cell(0, 5, p)
            pdf.ln(3)
        pdf.output(str(path))
    return path


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--tokens-per-doc", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-single", action="store_true", help="skip the one-process full run")
    ap.add_argument("--keep", action="store_true", help="keep the generated folder")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="engrain-bench-ingest-"))
    docs = tmp / "docs"
    docs.mkdir()
    rng = random.Random(0)
    words = int(args.tokens_per_doc * 0.55)  # the generated words average ~1.8 tokens
    gen_s, paths = timed(lambda: [write_doc(docs, i, rng, words) for i in range(args.docs)])
    sizes = sum(p.stat().st_size for p in paths)
    kinds = {}
    for p in paths:
        kinds[p.suffix[1:]] = kinds.get(p.suffix[1:], 0) + 1
    print(f"generated {len(paths)} files ({sizes / 2**20:.1f} MB; {kinds}) in {gen_s:.1f} s", file=sys.stderr)

    tok_s, tokenizer = timed(lambda: load_tokenizer(None))
    # Import every parser now so the first timed run does not pay imports the later ones get for free.
    from engrain.corpus.parsers import docx as _docx, html as _html, jsonl as _jsonl, pdf as _pdf  # noqa: F401
    cfg = IngestConfig(workers=args.workers)
    rows = []

    def run(name: str, ws: Workspace, config: IngestConfig) -> dict:
        cpu0 = os.times()
        seconds, summary = timed(lambda: ingest(docs, ws, config, tokenizer=tokenizer))
        cpu1 = os.times()
        cpu = sum(cpu1[:4]) - sum(cpu0[:4])  # user+system, this process and its finished workers
        s = summary.to_dict()
        rows.append({"run": name, "seconds": round(seconds, 3), "cpu_s": round(cpu, 2), "files": s["files_seen"], "parsed": s["ingested"],
                     "unchanged": s["unchanged"], "docs_per_s": round(s["files_seen"] / seconds, 1),
                     "tokens_processed": s["tokens_processed"],
                     "tokens_per_s": round(s["tokens_processed"] / seconds, 1), "chunks_new": s["chunks_new"],
                     "failed": len(s["failed"]), "phases": s["phases"]})
        print(f"{name}: {seconds:.2f} s", file=sys.stderr)
        return s

    ws = Workspace.at(tmp / "ws")
    full = run("full", ws, cfg)
    if not args.no_single:
        run("full-1proc", Workspace.at(tmp / "ws-single"), cfg.model_copy(update={"workers": 1}))
    run("noop", ws, cfg)
    # 1%: half touched (same bytes, new mtime), half edited (a sentence appended)
    picked = random.Random(1).sample(paths, max(2, args.docs // 100))
    half = len(picked) // 2
    for p in picked[:half]:
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    for p in picked[half:]:
        if p.suffix in (".txt", ".md"):
            p.write_text(p.read_text(encoding="utf-8") + "\n\nAn added closing sentence about the river.",
                         encoding="utf-8")
        else:
            write_doc(docs, int(p.stem[3:]), random.Random(int(p.stem[3:]) + 7), words, kind=p.suffix[1:])
    incr = run("incr-1%", ws, cfg)

    full_s = rows[0]["seconds"]
    for r in rows:
        r["vs_full"] = round(r["seconds"] / full_s, 4)
    header = ["run", "seconds", "cpu_s", "vs_full", "files", "parsed", "unchanged", "docs_per_s", "tokens_processed",
              "tokens_per_s", "chunks_new", "failed", "phases"]
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in header]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(r[h]).ljust(w) for h, w in zip(header, widths)))
    result = {"docs": args.docs, "corpus_tokens": full["tokens"], "corpus_chunks": full["chunks"],
              "bytes": sizes, "kinds": kinds, "workers": args.workers, "tokenizer_load_s": round(tok_s, 3),
              "incremental_target": "incr-1% < 10% of full", "incremental_ratio": rows[-1]["vs_full"],
              "incremental_changed": {"new": len(incr["new"]), "changed": len(incr["changed"]),
                                      "removed": len(incr["removed"])},
              "cpu_count": os.cpu_count(), "rows": rows}
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"corpus: {full['tokens']:,} tokens in {full['chunks']:,} chunks; "
          f"incremental re-ingest = {rows[-1]['vs_full']:.1%} of the full run (target < 10%)")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

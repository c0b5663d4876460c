"""Does reusing retrieved chunks' KV (``engrain serve --reuse-chunks``) change rag's answers, and how much faster
does the server answer? The same workspace is served twice, without and with the option, and every question of
the benchmark is asked once through the HTTP API by concurrent clients (rag, greedy); the answers are scored as
``engrain compare`` scores them and paired question by question.

    python experiments/answering/reuse_chunks.py   # writes experiments/answering/results/reuse-chunks/results.json

The workspace (examples/acme ingested and indexed with the defaults, no memory trained) is built under
``bench/out`` on the first run. The wall time of each pass is what the clients waited for all questions: the
benchmark's requests/s side by side in one run (a second pass of each, in the other order, says how far the host
moved between passes).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from bench_serve import EXAMPLE, KEY, OUT, free_port, wait_healthy  # noqa: E402

from engrain.atomic import write_text  # noqa: E402
from engrain.evaluate import metrics  # noqa: E402
from engrain.evaluate.bench import read_questions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "reuse-chunks" / "results.json"
MAX_TOKENS = 48  # engrain compare's answer budget for chat questions


def workspace(root: Path) -> Path:
    from engrain.corpus.ingest import ingest
    from engrain.rag.index import build_index
    from engrain.workspace import Workspace

    ws = Workspace.at(root)
    if not ws.documents_path.is_file():
        ingest(EXAMPLE / "docs", ws)
    if not ws.index_dir.is_dir():
        build_index(ws)
    return ws.root


def ask_all(ws: Path, questions: list, reuse: bool, clients: int) -> dict:
    """Serve ``ws`` (with ``--reuse-chunks`` when ``reuse``), ask every question once over ``clients`` concurrent
    clients, stop the server. Returns the answers by id, the wall time and the server's cache statistics."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = OUT / f"reuse-chunks-{'on' if reuse else 'off'}.log"
    command = [sys.executable, "-c", "from engrain.cli import main; main()", "serve", "-w", str(ws), "--api-key", KEY,
               "--port", str(port)] + (["--reuse-chunks"] if reuse else [])
    answers: dict[str, str] = {}
    todo = list(questions)
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as http:
            while True:
                with lock:
                    if not todo:
                        return
                    q = todo.pop(0)
                body = {"model": f"{ws.name}:rag", "messages": [{"role": "user", "content": q.question}],
                        "max_tokens": MAX_TOKENS, "temperature": 0}
                r = http.post(url + "/v1/chat/completions", json=body)
                r.raise_for_status()
                with lock:
                    answers[q.id] = r.json()["choices"][0]["message"]["content"]

    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, proc, log)
            t0 = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            stats = httpx.get(url + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()
        finally:
            proc.terminate()
            proc.wait(120)
    if len(answers) != len(questions):
        raise SystemExit(f"only {len(answers)} of {len(questions)} questions were answered; see {log}")
    return {"answers": answers, "seconds": round(wall, 1), "rps": len(questions) / wall,
            "prompt_cache": stats.get("prompt_cache")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    ws = workspace(OUT / "reuse-chunks-ws" / "acme")
    questions = read_questions(EXAMPLE / "questions.jsonl")
    passes = {}
    for name, reuse in (("off", False), ("on", True), ("on-again", True), ("off-again", False)):
        passes[name] = ask_all(ws, questions, reuse, args.clients)
        print(f"{name}: {passes[name]['seconds']} s, {passes[name]['rps']:.2f} requests/s", flush=True)
    scores = {name: [metrics.contains(p["answers"][q.id], q.answers) for q in questions] for name, p in passes.items()}
    n = len(questions)
    summary = {name: {"contains": sum(s) / n, "contains_ci": list(metrics.wilson_ci(sum(s), n)),
                      "seconds": passes[name]["seconds"], "rps": passes[name]["rps"],
                      "prompt_cache": passes[name]["prompt_cache"]} for name, s in scores.items()}
    result = {
        "question": "rag through engrain serve, chunks' KV reused (on) against not (off), 8 clients, greedy",
        "benchmark": "examples/acme", "n_questions": n, "clients": args.clients, "max_tokens": MAX_TOKENS,
        "passes": summary,
        "on_vs_off": metrics.paired_difference(scores["on"], scores["off"]),
        "on_again_vs_on": metrics.paired_difference(scores["on-again"], scores["on"]),
        "off_again_vs_off": metrics.paired_difference(scores["off-again"], scores["off"]),
        "answers": {f"rag-{name}": [{"id": q.id, "answer": passes[name]["answers"][q.id]} for q in questions]
                    for name in passes},
        "environment": {"python": platform.python_version(), "torch": version("torch"),
                        "transformers": version("transformers"), "engrain": version("engrain"),
                        "machine": platform.machine(), "processor": platform.processor()},
        "seed": 0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=1) + "\n")
    d = result["on_vs_off"]
    print(f"contains: off {summary['off']['contains']:.3f}, on {summary['on']['contains']:.3f}; on - off "
          f"{d['diff']:+.3f} [{d['diff_ci'][0]:+.3f}, {d['diff_ci'][1]:+.3f}] p={d['p_value']:.2g} "
          f"({d['wins']} won / {d['losses']} lost); wrote {args.out}")


if __name__ == "__main__":
    main()

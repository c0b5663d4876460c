"""Load on ``engrain serve``: N concurrent clients for a bounded time on loopback, mixed memories, half streaming.

Builds (once, kept in bench/out/serve-ws/acme) a workspace from the example corpus with the embedded model:
ingest, index, and a LoRA memory trained for a few steps (quality is not the point here, serving it is). Then starts
the real server as a subprocess and runs, side by side in one run:

  1 client   for --solo-seconds   (the unbatched baseline)
  N clients  for --seconds        (requests queue and are batched per memory)

and reports requests/s, completion tokens/s, p50/p95 latency, errors, and the server's RSS (idle and peak, sampled
every 0.2 s), then checks the server is still healthy and answers the same greedy question as before the load.

    python bench/bench_serve.py [--clients 8] [--seconds 30] [--solo-seconds 15] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import psutil

if TYPE_CHECKING:
    from engrain.config import IngestConfig
    from engrain.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
EXAMPLE = ROOT / "examples" / "acme"
KEY = "bench-key-0123456789"


def indexed_workspace(root: Path, config: IngestConfig | None = None) -> Workspace:
    """The example corpus ingested (with ``config``) and indexed at ``root``, each step skipped once done."""
    from engrain.corpus.ingest import ingest
    from engrain.rag.index import build_index
    from engrain.workspace import Workspace

    ws = Workspace.at(root)
    if not ws.documents_path.is_file():
        ingest(EXAMPLE / "docs", ws, config)
    if not ws.index_dir.is_dir():
        build_index(ws)
    return ws


def build_workspace(root: Path) -> Path:
    from engrain.config import TrainConfig
    from engrain.memory.parametric import META_FILE
    from engrain.train.loop import train

    ws = indexed_workspace(root)
    if not (ws.memory_dir("lora") / META_FILE).is_file():
        rows = []
        for q in map(json.loads, (EXAMPLE / "questions.jsonl").read_text().splitlines()[:40]):
            rows.append({"id": q["id"], "strategy": "qa", "chunk_ids": [], "doc_ids": q.get("docs", []), "seed": 0,
                         "messages": [{"role": "user", "content": q["question"]},
                                      {"role": "assistant", "content": q["answers"][0]}]})
        ws.synth_dir.mkdir(parents=True, exist_ok=True)
        (ws.synth_dir / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        train(ws, TrainConfig(memory="lora", max_steps=3, seq_len=256, micro_batch=2, replay_share=0.0,
                              eval_every=50, save_every=0), None, show_progress=False)
    return ws.root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.2)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    """Until ``url`` answers (any status below 500: a server without /health answers 404), or fail naming ``log``."""
    deadline = time.time() + 600
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the server did not start; see {log}")
        time.sleep(0.5)


def one_request(client: httpx.Client, url: str, model: str, question: str, stream: bool, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "stream": stream}
    t0 = time.perf_counter()
    if not stream:
        r = client.post(url + "/v1/chat/completions", json=body)
        r.raise_for_status()
        data = r.json()
        return {"ms": (time.perf_counter() - t0) * 1000, "tokens": data["usage"]["completion_tokens"],
                "text": data["choices"][0]["message"]["content"]}
    first, n, text, done = None, 0, [], False
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
                break
            if line.startswith("data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    first = first or time.perf_counter()
                    n += 1
                    text.append(piece)
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    return {"ms": (time.perf_counter() - t0) * 1000, "tokens": n, "text": "".join(text),
            "ttft_ms": ((first or time.perf_counter()) - t0) * 1000}


def load(url: str, models: list[str], questions: list[str], clients: int, seconds: float, max_tokens: int) -> dict:
    results, errors = [], []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client_loop(i: int) -> None:
        rng = random.Random(i)
        http = httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
        for k in itertools.count():
            if time.perf_counter() >= deadline:
                break
            model = models[(i + k) % len(models)]
            stream = (i + k) % 2 == 1
            try:
                res = one_request(http, url, model, rng.choice(questions), stream, max_tokens)
                res.update(model=model, stream=stream)
                with lock:
                    results.append(res)
            except Exception as exc:  # counted, never hidden
                with lock:
                    errors.append(f"{model}: {exc}")
        http.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0  # includes the requests still running at the deadline
    lat = sorted(r["ms"] for r in results)
    pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")  # noqa: E731
    ttft = sorted(r["ttft_ms"] for r in results if "ttft_ms" in r)
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(results), "errors": len(errors),
            "error_samples": errors[:5], "rps": len(results) / wall,
            "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "p50_ms": pct(0.5), "p95_ms": pct(0.95), "mean_ms": statistics.fmean(lat) if lat else float("nan"),
            "ttft_p50_ms": ttft[len(ttft) // 2] if ttft else float("nan"),
            "by_model": {m: sum(r["model"] == m for r in results) for m in models}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--solo-seconds", type=float, default=15)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    ws_root = build_workspace(OUT / "serve-ws" / "acme")
    print(f"workspace ready in {time.time() - t0:.0f} s: {ws_root}", flush=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(OUT / "serve-server.log", "w")
    server = subprocess.Popen([sys.executable, "-c", "from engrain.cli import main; main()", "serve", "-w",
                               str(ws_root), "--port", str(port), "--api-key", KEY],
                              stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        wait_healthy(url, server, OUT / "serve-server.log")
        health0 = httpx.get(url + "/health").json()
        http = httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
        models = [m["id"] for m in http.get(url + "/v1/models").json()["data"]]
        questions = [json.loads(x)["question"] for x in (EXAMPLE / "questions.jsonl").read_text().splitlines()]
        probe_model = next((m for m in models if m.endswith(":lora")), models[0])
        before = one_request(http, url, probe_model, questions[0], False, args.max_tokens)["text"]
        sampler = RssSampler(server.pid)
        sampler.start()
        solo = load(url, models, questions, 1, args.solo_seconds, args.max_tokens)
        many = load(url, models, questions, args.clients, args.seconds, args.max_tokens)
        sampler.stop.set()
        health1 = http.get(url + "/health").json()
        after = one_request(http, url, probe_model, questions[0], False, args.max_tokens)["text"]
    finally:
        server.terminate()
        code = server.wait(120)
        log.close()

    rows = [("1 client", solo), (f"{args.clients} clients", many)]
    print(f"\nengrain serve on loopback, {len(models)} models ({', '.join(m.split(':', 1)[1] for m in models)}), "
          f"max_tokens {args.max_tokens}, half of the requests streamed; {os.cpu_count()} cores, shared machine "
          f"(load average {os.getloadavg()[0]:.1f}): numbers are noisy")
    print(f"{'run':<12}{'requests':>9}{'errors':>7}{'req/s':>8}{'tok/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'ttft p50':>9}")
    for name, r in rows:
        print(f"{name:<12}{r['requests']:>9}{r['errors']:>7}{r['rps']:>8.2f}{r['tokens_per_s']:>8.1f}"
              f"{r['p50_ms']:>9.0f}{r['p95_ms']:>9.0f}{r['ttft_p50_ms']:>9.0f}")
    ratio = many["rps"] / solo["rps"] if solo["rps"] else float("nan")
    print(f"throughput {args.clients} clients / 1 client: {ratio:.2f}x requests/s, "
          f"{many['tokens_per_s'] / max(solo['tokens_per_s'], 1e-9):.2f}x tokens/s; largest batch "
          f"{health1['max_batch_seen']}, {health1['batches']} batches for {health1['jobs']} requests")
    print(f"server RSS: idle {health0['rss_mb']:.0f} MB, peak under load {sampler.peak / 2**20:.0f} MB; "
          f"model weights held {health0['weights_mb']:.0f} MB (base + adapters, shared tensors once)")
    print(f"after the load: server healthy ({health1['status']}), same answer as before: {after == before}, "
          f"exit code after SIGTERM {code}")
    for name, r in rows:
        for e in r["error_samples"]:
            print(f"  error ({name}): {e}")
    result = {"models": models, "max_tokens": args.max_tokens, "solo": solo, "concurrent": many,
              "throughput_ratio": ratio, "rss_idle_mb": health0["rss_mb"], "rss_peak_mb": sampler.peak / 2**20,
              "weights_mb": health0["weights_mb"], "health_after": health1, "same_answer_after": after == before,
              "exit_code": code, "load_average": os.getloadavg()}
    (OUT / "serve.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {OUT / 'serve.json'}")


if __name__ == "__main__":
    main()

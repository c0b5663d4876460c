"""Where a rag admission's prefill time goes in the server's decode loop (``stream.Stream.admit``), by part, against
the same prompts prefilled alone, in one run:

    python bench/bench_admission.py [--repeats 5] [--running 6] [--joining 2] [--threads]

A server under 8 rag clients admits a request or two at a time into rows still decoding (``scheduler._join``), and
``/health``'s ``worker_seconds`` and ``prefill_tokens`` give its prefill's time per token computed. This bench makes
such admissions in one process: ``--joining`` rag-sized prompts (acme's documents in view, different passages and
questions, the system prompt's KV cached as a server's prompt cache holds it) join ``--running`` rows half way
through their answers. Each admission is timed whole and by part: the prefill forward
(``fastgen.prefill_after_starts``), the prompt cache's lookups and copies (``PromptCache.match``, ``_row_kv``,
``PromptCache.add``) and the merge of the new rows into the running ones' KV (``fastgen._merge``). "Alone" admits
each prompt into an empty stream with the same cache, so its time per token is what one prompt costs; the model at
its defaults. Median of ``--repeats`` per form, alternately. Prints a table, writes bench/out/admission.json.

``--threads``: rag prompts admitted alone on a long-lived worker thread, as the server's scheduler runs them, the
model loaded on a passing thread (what ``engrain serve`` does, ``serve/passing_thread.py``); again after a relevance
gate's embedding of a question on a passing thread (what the server's request handlers do now); after the same
embedding on a thread that lives on (what they did: its OpenMP pool stays beside the worker's); and after the main
thread has run parallel work of its own (what loading the model on the main thread did). In that order, as a pool
left alive cannot be taken back.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_answer_speed import EXAMPLE, OUT  # noqa: E402
from bench_prompt_cache import half_way  # noqa: E402

from engrain.models import chat_messages, chat_prompt, load_model  # noqa: E402
from engrain.models import stream as stream_mod  # noqa: E402
from engrain.models.prompt_cache import PromptCache  # noqa: E402
from engrain.rag.embeddings import load_embedder  # noqa: E402
from engrain.serve.passing_thread import on_passing_thread  # noqa: E402

PARTS = {"forward": (stream_mod, "prefill_after_starts"), "merge": (stream_mod, "_merge"),
         "cache copies": (stream_mod, "_row_kv"), "cache lookups": (PromptCache, "match"),
         "cache adds": (PromptCache, "add")}
SECONDS: dict[str, float] = defaultdict(float)


def timed(part: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SECONDS[part] += time.perf_counter() - t0
    return wrapper


def rag_prompts(tokenizer, n: int, tokens: tuple[int, int] = (330, 420)) -> list[list[int]]:
    """``n`` chat prompts with passages of acme's documents in view and acme's questions, of ``tokens`` lengths."""
    words = " ".join(p.read_text(encoding="utf-8") for p in sorted((EXAMPLE / "docs").glob("*.md"))).split()
    questions = [json.loads(x)["question"] for x in (EXAMPLE / "questions.jsonl").read_text().splitlines()]
    prompts = []
    for i in range(n):
        want = tokens[0] + (tokens[1] - tokens[0]) * i // max(1, n - 1)
        start, size = (i * 157) % (len(words) // 2), 40
        while True:
            ids = tokenizer(chat_prompt(tokenizer, chat_messages(questions[i], " ".join(words[start:start + size]))),
                            add_special_tokens=False)["input_ids"]
            if len(ids) >= want:
                break
            size += 5
        prompts.append(ids)
    return prompts


def system_head(tokenizer) -> list[int]:
    """A chat prompt whose start is every rag prompt's: the KV a server's prompt cache holds after one request."""
    return tokenizer(chat_prompt(tokenizer, chat_messages("Hello?", "A")), add_special_tokens=False)["input_ids"]


def admit_s(lm, joining: list[list[int]], running: list[list[int]], head: list[int]) -> tuple[float, dict, int]:
    """Seconds to admit ``joining`` into a stream decoding ``running`` (none: an empty stream), its parts' seconds,
    and the tokens its forwards computed."""
    cache = PromptCache()
    stream_mod.Stream(lm.model, pad_id=lm.tokenizer.pad_token_id, prompt_cache=cache).admit([head], [1])
    stream = half_way(lm, cache, running)
    SECONDS.clear()
    before = dict(stream.prefilled)
    t0 = time.perf_counter()
    stream.admit(joining, [1] * len(joining))
    took = time.perf_counter() - t0
    return took, dict(SECONDS), stream.prefilled["tokens"] - before["tokens"]


# In this order, as a pool left alive cannot be taken back.
THREAD_FORMS = ("worker thread, no other pool", "after a gate's embedding on a passing thread",
                "after a gate's embedding on a thread that lives on", "the main thread's pool alive too")


def threads(repeats: int) -> dict:
    """ms per prompt token of rag prompts admitted alone on a worker thread (``THREAD_FORMS``): with no other OpenMP
    pool, then after other threads' parallel work left pools or not; the models loaded on passing threads."""
    lm = on_passing_thread(lambda: load_model(None, device="cpu"))
    prompts, head = rag_prompts(lm.tokenizer, 2), system_head(lm.tokenizer)
    jobs: queue.Queue = queue.Queue()
    done: queue.Queue = queue.Queue()

    def worker() -> None:  # long-lived, as the server's scheduler thread
        with torch.inference_mode():
            admit_s(lm, [prompts[0]], [], head)  # warm-up
            while (label := jobs.get()) is not None:
                took = [admit_s(lm, [p], [], head) for _ in range(repeats) for p in prompts]
                done.put((label, statistics.median(1000 * s / n for s, _, n in took)))

    embedder = on_passing_thread(lambda: load_embedder(None))
    question = "Which harbour do the ferries leave from?"
    handler_done, handler_end = threading.Event(), threading.Event()

    def handler() -> None:  # a thread that lives on after its embedding, as the server's event loop
        embedder.encode([question])
        handler_done.set()
        handler_end.wait()

    thread = threading.Thread(target=worker)
    thread.start()
    handler_thread = threading.Thread(target=handler)
    out = {}
    for label in THREAD_FORMS:
        if label == "after a gate's embedding on a passing thread":
            on_passing_thread(lambda: embedder.encode([question]))  # what the server's gates do now
        elif label == "after a gate's embedding on a thread that lives on":
            handler_thread.start()
            handler_done.wait()
        elif label == "the main thread's pool alive too":
            torch.ones(1024, 1024).mul(2.0).sum()  # parallel work on the main thread: its pool stays
        jobs.put(label)
        name, ms = done.get()
        out[name] = ms
    jobs.put(None)
    handler_end.set()
    for t in (thread, handler_thread):
        t.join()
    print(f"rag prompts of {', '.join(str(len(p)) for p in prompts)} tokens admitted alone, {lm.model.dtype}, "
          f"{torch.get_num_threads()} threads; median of {repeats} each")
    print("| where | ms per prompt token | x no other pool |")
    print("| --- | --- | --- |")
    base = out[THREAD_FORMS[0]]
    for name, ms in out.items():
        print(f"| {name} | {ms:.2f} | {ms / base:.2f} |")
    return {"ms_per_token": out, "prompt_tokens": [len(p) for p in prompts], "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--running", type=int, default=6)
    ap.add_argument("--joining", type=int, default=2)
    ap.add_argument("--threads", action="store_true", help="the worker thread with and without another pool")
    args = ap.parse_args()
    if args.threads:
        result = threads(args.repeats)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "admission-threads.json").write_text(json.dumps(
            {**result, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
             "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}, indent=2))
        print(f"wrote {OUT / 'admission-threads.json'}")
        return
    lm = load_model(None, device="cpu")
    tok = lm.tokenizer
    prompts = rag_prompts(tok, args.running + args.joining)
    running, joining = prompts[:args.running], prompts[args.running:]
    head = system_head(tok)
    for part, (owner, name) in PARTS.items():
        setattr(owner, name, timed(part, getattr(owner, name)))
    forms = {"alone, one at a time": [([p], []) for p in joining],
             f"together, into {args.running} running rows": [(joining, running)]}
    runs: dict[str, list[dict]] = {name: [] for name in forms}
    with torch.inference_mode():
        for cases in forms.values():  # warm-up
            for case in cases:
                admit_s(lm, *case, head)
        for _ in range(args.repeats):
            for name, cases in forms.items():
                took, parts, tokens = 0.0, defaultdict(float), 0
                for case in cases:
                    s, p, n = admit_s(lm, *case, head)
                    took, tokens = took + s, tokens + n
                    for k, v in p.items():
                        parts[k] += v
                runs[name].append({"seconds": took, "parts": dict(parts), "tokens": tokens})
    print(f"{args.joining} rag prompts of {', '.join(str(len(p)) for p in joining)} tokens ({len(head)} cached), "
          f"{lm.model.dtype}, {torch.get_num_threads()} threads; median of {args.repeats}")
    names = list(PARTS)
    print("| admission | seconds | ms per token computed | " + " | ".join(names) + " | tokens computed |")
    print("| --- " * (len(names) + 4) + "|")
    summary = {}
    for name, rs in runs.items():
        median = statistics.median(r["seconds"] for r in rs)
        parts = {k: statistics.median(r["parts"].get(k, 0.0) for r in rs) for k in names}
        tokens = rs[0]["tokens"]
        summary[name] = {"seconds": median, "parts": parts, "tokens": tokens, "ms_per_token": 1000 * median / tokens}
        print(f"| {name} | {median:.3f} | {1000 * median / tokens:.2f} | "
              + " | ".join(f"{parts[k]:.3f}" for k in names) + f" | {tokens} |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "admission.json").write_text(json.dumps(
        {"summary": summary, "runs": runs, "prompt_tokens": [len(p) for p in joining],
         "running_tokens": [len(p) for p in running], "cached_head": len(head), "repeats": args.repeats,
         "dtype": str(lm.model.dtype), "threads": torch.get_num_threads(), "cores": os.cpu_count(),
         "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}, indent=2))
    print(f"wrote {OUT / 'admission.json'}")


if __name__ == "__main__":
    main()

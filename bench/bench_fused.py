"""A fused hybrid's answers (``rag.hybrid: fused``, ``models/fused.py``) against the hybrid reading the chunks itself,
side by side in one run on this host:

    python bench/bench_fused.py [--questions 16] [--tokens 48] [--rounds 3] [--clients 8] [--seconds 30]

The embedded model on engrain's answering path, a merged LoRA of small random weights standing in for a trained
memory (``bench_answer_speed.merged_lora``; speed does not depend on what the weights learned), and ``--questions``
acme questions, each with a stretch of acme's documents as its chunks (rag's prompt). Two forms, alternately, best
of ``--rounds`` after a round that warms them up, ``engrain compare``'s batch of 16:
- read (``rag.hybrid: read``): the memory answers with the chunks in view, one reading;
- fused (the default): the base model with the chunks, the memory closed-book and the base model closed-book.
Answers run to ``--tokens`` new tokens (no stop token), so both forms decode the same number of steps. Prints the
seconds per question and the ratio.
Then ``engrain serve`` on ``bench_serve``'s acme workspace (its LoRA trained for a few steps) under ``--clients``
concurrent clients, answers of up to 24 tokens: rag, and lora+rag read (``rag.hybrid: read``) and fused (the default),
each for ``--seconds`` (``--clients 0`` skips it). Answers end at their stop token, so their lengths differ by method
(a hybrid's gate may also send a question to the base weights, closed-book): tokens/s is printed beside requests/s.
Writes bench/out/fused.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_answer_speed import merged_lora, serve_command, serve_load  # noqa: E402
from bench_serve import EXAMPLE, OUT, build_workspace  # noqa: E402

from engrain.config import apply_settings  # noqa: E402
from engrain.models import chat_messages, chat_prompt, cpu_model, load_model  # noqa: E402
from engrain.models.fused import Reading, fused_tokens  # noqa: E402
from engrain.models.fastgen import generate_many  # noqa: E402


def questions_and_chunks(n: int) -> list[tuple[str, str]]:
    """``n`` of acme's questions, each with another stretch of about 300 words of acme's documents in view (about the
    length of rag's three chunks)."""
    rows = [json.loads(line) for line in (EXAMPLE / "questions.jsonl").read_text(encoding="utf-8").splitlines()]
    words = " ".join(p.read_text(encoding="utf-8") for p in sorted((EXAMPLE / "docs").glob("*.md"))).split()
    step = max(1, (len(words) - 300) // n)
    return [(rows[i]["question"], " ".join(words[i * step:i * step + 300])) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30)
    args = ap.parse_args()
    base = load_model(None, device="cpu")
    memory = merged_lora(base)
    tok = base.tokenizer
    pairs = questions_and_chunks(args.questions)

    def encode(context: str | None, q: str) -> list[int]:
        return tok(chat_prompt(tok, chat_messages(q, context)), add_special_tokens=False)["input_ids"]

    with_chunks = [encode(c, q) for q, c in pairs]
    closed = [encode(None, q) for q, _ in pairs]
    kw = dict(max_new_tokens=args.tokens, stop_ids=[-1], pad_id=tok.pad_token_id)  # no stop: every step runs

    readings = [Reading(base.model, with_chunks, 1.0), Reading(memory.model, closed, 0.5),
                Reading(base.model, closed, -0.5)]
    forms = {"read": lambda: generate_many(memory.model, with_chunks, batch_size=16, **kw),
             "fused": lambda: fused_tokens(readings, batch_size=16, **kw)}
    best = dict.fromkeys(forms, float("inf"))
    for round_ in range(args.rounds + 1):
        for name, run in forms.items():
            t0 = time.perf_counter()
            run()
            took = time.perf_counter() - t0
            if round_:  # the first round warms every form up
                best[name] = min(best[name], took)
        print(f"round {round_}: " + ", ".join(f"{k} {v:.2f} s" for k, v in best.items()), flush=True)
    n = len(pairs)
    print(f"\n{n} questions, {args.tokens} new tokens each, chunk prompts of "
          f"{sum(map(len, with_chunks)) // n} tokens on average, closed-book prompts of {sum(map(len, closed)) // n}")
    print("| form | s per question | over read |")
    print("| --- | --- | --- |")
    for name, s in best.items():
        print(f"| {name} | {s / n:.3f} | {s / best['read']:.2f}x |")
    served = served_hybrids(args.clients, args.seconds) if args.clients else {}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fused.json").write_text(json.dumps(
        {"seconds": best, "questions": n, "new_tokens": args.tokens, "served": served, "cpu": cpu_model(),
         "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
         "args": vars(args)}, indent=1))
    print(f"wrote {OUT / 'fused.json'}")


def served_hybrids(clients: int, seconds: float) -> dict:
    """Requests/s, tokens/s and p50 latency of rag and of lora+rag read and fused, ``clients`` at a time, a server
    for rag and the reading hybrid and one for the fused hybrid."""
    ws = build_workspace(OUT / "serve-ws" / "acme")
    command = serve_command(ws)
    settings = OUT / "fused-settings.yaml"
    out = {}
    try:
        for hybrid in ("read", "fused"):
            settings.write_text(f"rag:\n  hybrid: {hybrid}\n")
            apply_settings(ws / "engrain.yaml", settings)
            models = [f"{ws.name}:lora+rag"] if hybrid == "fused" else [f"{ws.name}:rag", f"{ws.name}:lora+rag"]
            rows = serve_load(command, models, clients, seconds, f"fused-{hybrid}")
            out.update({("rag" if m.endswith(":rag") else f"lora+rag {hybrid}"): r for m, r in rows.items()})
    finally:
        settings.write_text("rag:\n  hybrid: fused\n")  # the next run starts from the default again
        apply_settings(ws / "engrain.yaml", settings)
    print(f"\n{clients} clients, answers of up to 24 tokens")
    print("| served | requests/s | tokens/s | p50 latency (s) |")
    print("| --- | --- | --- | --- |")
    for name, row in out.items():
        print(f"| {name} | {row['rps']:.2f} | {row['tokens_per_s']:.1f} | {row['p50_ms'] / 1000:.2f} |")
    return out


if __name__ == "__main__":
    main()

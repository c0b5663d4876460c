"""The bf16 answering path with its linear layers' products in bf16, in fp32 and in int8 (``model.prefill_dtype``),
side by side in one run on this host:

    python bench/bench_prefill_dtype.py [--forms bfloat16,float32,int8] [--rounds 4] [--clients 8] [--seconds 20]
                                        [--serve-rounds 2]

A CPU can report native bf16 and multiply it slower than fp32 (``models.load.bf16_speedup_cpu``, printed first);
``model.prefill_dtype: auto`` then packs the layers that prefills and decode steps of many rows read in fp32
(``models/packed_weights.py``); int8 (asked for by name) takes W8A8 products (``models.load.int8_speedup_cpu``, also
printed, times one). In one process, the forms alternately (best of ``--rounds``; the first round warms them up):
the first token of a 477-token prompt, batch-1 decode after chat questions (4-bit decode weights either way: it
should not move), and a batch of 16 rag-sized prompts' first tokens (``engrain compare``'s batches). Then ``engrain
serve`` on acme's workspace under ``--clients`` concurrent clients, 24-token answers, base and rag, the forms in turn
``--serve-rounds`` times, each keeping its best round (a server under load varies by a tenth or more between runs
of the same code). Prints one table (ratios over the first form) and writes bench/out/prefill_dtype.json.
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
from bench_answer_speed import QUESTIONS, configure, decode_rate, long_prompt, serve_load  # noqa: E402
from bench_serve import EXAMPLE, KEY, OUT, build_workspace  # noqa: E402

from engrain.config import RagConfig  # noqa: E402
from engrain.models import chat_messages, chat_prompt, cpu_model, generate, load_model  # noqa: E402
from engrain.models.load import prefill_dtype_for  # noqa: E402

FORMS = ("bfloat16", "float32", "int8")


def rag_prompts(tokenizer, long: str, n: int) -> list[str]:
    """``n`` chat prompts of about ``long``'s length in tokens, each with another stretch of acme's documents in view
    (no two share a start past the system prompt, so the prompt cache spares none of them)."""
    words = " ".join(p.read_text(encoding="utf-8") for p in sorted((EXAMPLE / "docs").glob("*.md"))).split()
    size = len(long.split())  # words, the chat template's included: near enough
    step = max(1, (len(words) - size) // n)
    return [chat_prompt(tokenizer, chat_messages("Who founded the company?", " ".join(words[i * step:i * step + size])))
            for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--serve-rounds", type=int, default=2)
    ap.add_argument("--forms", default=",".join(FORMS), help="model.prefill_dtype values, comma-separated")
    args = ap.parse_args()
    forms = args.forms.split(",")
    cpu = cpu_model()
    chosen = prefill_dtype_for("cpu")
    print(f"CPU: {cpu}; bf16 products at {cpu['bf16_speedup']}x fp32's speed: auto prefills in {chosen}")
    lms = {form: load_model(None, device="cpu", prefill_dtype=form) for form in forms}
    tok = lms[forms[0]].tokenizer
    long = long_prompt(tok)
    chats = [chat_prompt(tok, chat_messages(q)) for q in QUESTIONS]
    batch = rag_prompts(tok, long, 16)
    best = {form: {"first_token_s": float("inf"), "batch16_first_token_s": float("inf"), "decode": 0.0}
            for form in forms}
    for round_ in range(args.rounds + 1):
        for form, lm in lms.items():
            t0 = time.perf_counter()
            generate(lm, [long], max_new_tokens=1, batch_size=1)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            generate(lm, batch, max_new_tokens=1, batch_size=16)
            wide = time.perf_counter() - t0
            rate = decode_rate(lm, chats[:4], 32)
            if round_:  # the first round warms them up
                b = best[form]
                b["first_token_s"], b["batch16_first_token_s"] = min(b["first_token_s"], first), \
                    min(b["batch16_first_token_s"], wide)
                b["decode"] = max(b["decode"], rate)
        print(f"round {round_}: {json.dumps(best)}", flush=True)
    del lms
    ws = build_workspace(OUT / "serve-ws" / "acme")
    command = [sys.executable, "-c", "from engrain.cli import main; main()", "serve", "-w", str(ws), "--api-key", KEY]
    for _ in range(args.serve_rounds):  # the forms in turn; each keeps its round with the most requests/s
        for form in forms:
            configure(ws, "auto", RagConfig().top_k, form)
            rows = serve_load(command, [f"{ws.name}:base", f"{ws.name}:rag"], args.clients, args.seconds,
                              f"prefill-{form}")
            served = best[form].setdefault("serve", {})
            for model in ("base", "rag"):
                row = rows[f"{ws.name}:{model}"]
                if model not in served or row["rps"] > served[model]["rps"]:
                    served[model] = row
    configure(ws, "auto", RagConfig().top_k)  # the next run starts from the defaults again
    tokens = len(tok(long)["input_ids"])
    print_table(best, tokens, args.clients)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "prefill_dtype.json").write_text(json.dumps(
        {"forms": best, "auto": chosen, "prompt_tokens": tokens, "cpu": cpu,
         "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
         "args": vars(args)}, indent=1))
    print(f"wrote {OUT / 'prefill_dtype.json'}")


def print_table(best: dict, tokens: int, clients: int) -> None:
    """One row per measure, a column per form, then each form's ratio over the first (higher is better)."""
    names = list(best)
    print("| measure | " + " | ".join(names) + " | " + " | ".join(f"{n} over {names[0]}" for n in names[1:]) + " |")
    print("| --- " * (2 * len(names)) + "|")

    def row(name: str, key, fmt: str, higher_better: bool) -> None:
        values = [key(best[n]) for n in names]
        ratios = [(v / values[0] if higher_better else values[0] / v) for v in values[1:]]
        print(f"| {name} | " + " | ".join(f"{v:{fmt}}" for v in values) + " | "
              + " | ".join(f"{r:.2f}x" for r in ratios) + " |")

    row(f"first token, {tokens}-token prompt (s)", lambda b: b["first_token_s"], ".3f", False)
    row("first tokens, 16 rag-sized prompts (s)", lambda b: b["batch16_first_token_s"], ".2f", False)
    row("batch-1 decode (tokens/s)", lambda b: b["decode"], ".1f", True)
    for model in ("base", "rag"):
        row(f"{clients} clients, 24-token answers, {model} (requests/s)", lambda b: b["serve"][model]["rps"], ".2f",
            True)
        row(f"{clients} clients, {model}, p50 latency (s)", lambda b: b["serve"][model]["p50_ms"] / 1000, ".2f",
            False)


if __name__ == "__main__":
    main()

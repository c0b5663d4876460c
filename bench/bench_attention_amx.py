"""The embedded model answering with its bf16 attention in SDPA's kernel against the plain form, alternately in one
process: the first token of a 477-token prompt, and batch-1 decode after a short chat prompt and after a long one.

    python bench/bench_attention_amx.py [--rounds 4]

``fastgen.amx_attention`` sends bf16 attention to SDPA's kernel on a CPU with AMX tiles; this benchmark runs the
model's own answering path (``engrain.models.generate``) both ways on any CPU, so a host shows what the choice is
worth there. Best of ``--rounds`` per form (the first round warms both up).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from engrain.models import chat_messages, chat_prompt, fastgen, generate  # noqa: E402
from engrain.models.load import answering_lm, load_model  # noqa: E402

QUESTIONS = ["Explain in two sentences why the sky looks blue.",
             "What is the difference between weather and climate?",
             "Tell me about the history of the printing press."]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    lm = answering_lm(load_model())
    tok = lm.tokenizer
    long_ids = tok("word " * 470, add_special_tokens=False)["input_ids"][:477]
    first_prompt = tok.decode(long_ids)
    chats = [chat_prompt(tok, chat_messages(q, None)) for q in QUESTIONS]
    long_text = tok.decode(long_ids[:400]) + "\nSummarise the text above."  # plain text: it never ends at once

    def first_token() -> float:
        t0 = time.perf_counter()
        generate(lm, [first_prompt], max_new_tokens=1, batch_size=1)
        return time.perf_counter() - t0

    def decode(prompts: list[str]) -> float:
        t0 = time.perf_counter()
        gens = generate(lm, prompts, max_new_tokens=64, batch_size=1)
        return sum(g.completion_tokens for g in gens) / (time.perf_counter() - t0)

    measures = {"first token, 477-token prompt (s)": (first_token, min),
                "batch-1 decode after chat prompts (tokens/s)": (lambda: decode(chats), max),
                "batch-1 decode after a 400-token text (tokens/s)": (lambda: decode([long_text]), max)}
    chosen = fastgen.amx_attention(torch.device("cpu"))
    results: dict[tuple[str, bool], list[float]] = {}
    real = fastgen.amx_attention
    try:
        for _ in range(args.rounds):
            for sdpa in (True, False):
                fastgen.amx_attention = lambda device, sdpa=sdpa: sdpa
                for name, (run, _) in measures.items():
                    results.setdefault((name, sdpa), []).append(run())
    finally:
        fastgen.amx_attention = real
    print(f"{torch.get_num_threads()} threads, {next(lm.model.parameters()).dtype}; this CPU's default: "
          f"{'SDPA' if chosen else 'the plain form'} (AMX tiles: {chosen}); best of {args.rounds - 1} rounds after one "
          "warm-up")
    print("| measure | SDPA | plain form | SDPA's speed over the plain form's |")
    print("| --- | --- | --- | --- |")
    for name, (_, best) in measures.items():
        sdpa, plain = best(results[(name, True)][1:]), best(results[(name, False)][1:])
        ratio = plain / sdpa if best is min else sdpa / plain  # above 1: SDPA is faster
        digits = 3 if best is min else 1
        print(f"| {name} | {sdpa:.{digits}f} | {plain:.{digits}f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()

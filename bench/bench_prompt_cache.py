"""First token of a retrieval-sized prompt through the server's decode loop (``stream.Stream``), without and with
the prompt cache (``src/engrain/models/prompt_cache.py``), in one run:

    python bench/bench_prompt_cache.py [--repeats 5]    # prints a table, writes bench/out/prompt_cache.json

Rows: a prompt with no cache (what every prompt paid before the cache); a new prompt with an empty cache (the
cache's own cost: keeping the prompt's KV); a new question over the chunks an earlier prompt had in view (the
same chunks retrieved again); the same prompt again. The prompt is acme's documents in view as rag asks (about
``PROMPT_TOKENS`` tokens, ``bench_answer_speed.long_prompt``), the model at its defaults. Median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_answer_speed import OUT, long_prompt  # noqa: E402

from engrain.models import fastgen, load_model  # noqa: E402
from engrain.models.prompt_cache import PromptCache  # noqa: E402
from engrain.models.stream import Stream  # noqa: E402

QUESTION, OTHER = "Who founded the company?", "Where is the company based?"


def first_token_s(lm, prompt: list[int], cache_with: list[int] | None, cached: bool) -> float:
    """Seconds from admitting ``prompt`` to its first token; the cache (when ``cached``) holds ``cache_with``."""
    cache = PromptCache() if cached else None
    if cache is not None and cache_with is not None:
        Stream(lm.model, pad_id=lm.tokenizer.pad_token_id, prompt_cache=cache).admit([cache_with], [1])
    stream = Stream(lm.model, pad_id=lm.tokenizer.pad_token_id, prompt_cache=cache)
    t0 = time.perf_counter()
    stream.admit([prompt], [1])
    stream.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    lm = load_model(None, device="cpu")
    text = long_prompt(lm.tokenizer)
    assert QUESTION in text
    first, other = (lm.tokenizer(t, add_special_tokens=False)["input_ids"]
                    for t in (text, text.replace(QUESTION, OTHER)))
    shared = fastgen.common_start([first, other])
    rows = {"no cache": (first, None, False), "new prompt, empty cache": (first, None, True),
            "new question, same chunks cached": (other, first, True), "same prompt again": (first, first, True)}
    with torch.inference_mode():
        for case in rows.values():
            first_token_s(lm, *case)  # warm-up
        seconds = {name: [first_token_s(lm, *case) for _ in range(args.repeats)] for name, case in rows.items()}
    median = {name: statistics.median(s) for name, s in seconds.items()}
    print(f"{len(first)}-token prompt ({shared} tokens before the question), {lm.model.dtype}, "
          f"{torch.get_num_threads()} threads")
    print("| first token | seconds | x no cache |")
    print("| --- | --- | --- |")
    for name, s in median.items():
        print(f"| {name} | {s:.3f} | {s / median['no cache']:.2f} |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "prompt_cache.json").write_text(json.dumps(
        {"first_token_s": median, "seconds": seconds, "prompt_tokens": len(first), "shared_tokens": shared,
         "repeats": args.repeats, "dtype": str(lm.model.dtype), "threads": torch.get_num_threads(),
         "cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        indent=2))
    print(f"wrote {OUT / 'prompt_cache.json'}")


if __name__ == "__main__":
    main()

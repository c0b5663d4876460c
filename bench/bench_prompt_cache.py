"""First token of a retrieval-sized prompt through the server's decode loop (``stream.Stream``), without and with
the prompt cache (``src/engrain/models/prompt_cache.py``), in one run:

    python bench/bench_prompt_cache.py [--repeats 5]    # prints a table, writes bench/out/prompt_cache.json

Rows: a prompt with no cache (what every prompt paid before the cache); a new prompt with an empty cache (the
cache's own cost: keeping the prompt's KV); a new question over the chunks an earlier prompt had in view (the
same chunks retrieved again); the same prompt again. The prompt is acme's documents in view as rag asks (about
``PROMPT_TOKENS`` tokens, ``bench_answer_speed.long_prompt``), the model at its defaults. Median of ``--repeats``.

Then one admission as a server under load makes it: chat questions asked before (their whole prompts cached) and
new ones (only the system prompt cached) join six rows half way through their answers: together, each after its own
cached start, in one forward per group of similar lengths (what ``Stream.admit`` does), against one forward for
each cached start (what it did before), to the next token of every row.
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

from engrain.models import chat_messages, chat_prompt, fastgen, load_model  # noqa: E402
from engrain.models.prompt_cache import PromptCache  # noqa: E402
from engrain.models.stream import Stream  # noqa: E402

QUESTION, OTHER = "Who founded the company?", "Where is the company based?"
# A server under 8 clients admits two or three requests at a time into the rows still decoding.
ASKED = ["What is the capital of France?", "Name three primary colours."]  # asked before: whole prompts cached
NEW = ["Why is the sky blue?"]  # not asked before: only the system prompt is cached
RUNNING = ["How do plants drink water?", "What is the opposite of cold?", "What does a bee make?",
           "Who wrote Romeo and Juliet?", "What is the largest ocean?", "What colour is grass?"]  # decoding


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


def half_way(lm, cache: PromptCache, running: list[list[int]]) -> Stream:
    """A stream on ``cache`` whose ``running`` prompts are half way through 48-token answers (none: an empty one)."""
    stream = Stream(lm.model, pad_id=lm.tokenizer.pad_token_id, prompt_cache=cache)
    if running:
        stream.admit(running, [48] * len(running))
        for _ in range(24):
            stream.step()
            stream.advance(set())
    return stream


def admission_s(lm, groups: list[list[list[int]]], cached: list[list[int]], running: list[list[int]]) -> float:
    """Seconds to admit ``groups`` (one ``admit`` call, so one prefill forward, each) into a stream already decoding
    ``running`` and make the next token of all, with ``cached`` prompts in the cache beforehand."""
    cache = PromptCache()
    Stream(lm.model, pad_id=lm.tokenizer.pad_token_id, prompt_cache=cache).admit(cached, [1] * len(cached))
    stream = half_way(lm, cache, running)
    t0 = time.perf_counter()
    for group in groups:
        stream.admit(group, [1] * len(group))
    stream.step()
    return time.perf_counter() - t0


def admissions(lm, repeats: int) -> dict:
    """One admission of ``ASKED`` and ``NEW`` questions: together after their own cached starts, against one forward
    per cached start; median seconds of ``repeats``, alternately."""
    chat = [lm.tokenizer(chat_prompt(lm.tokenizer, chat_messages(q)), add_special_tokens=False)["input_ids"]
            for q in ASKED + NEW + RUNNING]
    asked, new, running = chat[:len(ASKED)], chat[len(ASKED):len(ASKED) + len(NEW)], chat[len(ASKED) + len(NEW):]
    forms = {"together, forwards by length": [asked + new], "one forward per cached start": [[p] for p in asked] + [new]}
    seconds = {name: [] for name in forms}
    with torch.inference_mode():
        admission_s(lm, forms["together, forwards by length"], asked, running)  # warm-up
        for _ in range(repeats):
            for name, groups in forms.items():
                seconds[name].append(admission_s(lm, groups, asked, running))
    median = {name: statistics.median(s) for name, s in seconds.items()}
    print(f"one admission: {len(asked)} questions asked before, {len(new)} new; {len(running)} rows running")
    print("| admission | seconds to the first tokens | x one forward per start |")
    print("| --- | --- | --- |")
    for name, s in median.items():
        print(f"| {name} | {s:.3f} | {s / median['one forward per cached start']:.2f} |")
    return {"median_s": median, "seconds": seconds, "asked": len(asked), "new": len(new), "running": len(running)}


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
    admission = admissions(lm, args.repeats)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "prompt_cache.json").write_text(json.dumps(
        {"first_token_s": median, "admission": admission, "seconds": seconds, "prompt_tokens": len(first), "shared_tokens": shared,
         "repeats": args.repeats, "dtype": str(lm.model.dtype), "threads": torch.get_num_threads(),
         "cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        indent=2))
    print(f"wrote {OUT / 'prompt_cache.json'}")


if __name__ == "__main__":
    main()

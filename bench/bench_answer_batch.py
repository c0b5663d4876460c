"""How many rows to decode together when answering many prompts (``models.answer``'s ``batch_size``): the replay
prompts training answers once per model, the same prompts at each size, alternately in one run.

    python bench/bench_answer_batch.py [--prompts 64] [--sizes 16,32,64] [--rounds 2]

Greedy answers of the embedded model in the dtype it answers in, up to the replay's answer length. Prints the best
seconds per size over the rounds, each size's speed against the first, and how many answers equal the first size's:
in bf16 the batch shape changes the rounding, so a few greedy answers differ.
"""

from __future__ import annotations

import argparse
import time

import torch

from engrain.config import TrainConfig
from engrain.models import answer, answering_lm, load_model
from engrain.train.replay import replay_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--sizes", default="16,32,64")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    lm = answering_lm(load_model(None))
    prompts = replay_prompts()[:args.prompts]
    max_new = TrainConfig().replay_max_new_tokens
    answer(lm, prompts[:4], max_new_tokens=4)  # warm-up: the decode weights, the first kernels
    best: dict[int, float] = {}
    texts: dict[int, list[str]] = {}
    for _ in range(args.rounds):
        for size in sizes:
            started = time.perf_counter()
            texts[size] = [g.text for g in answer(lm, prompts, max_new_tokens=max_new, batch_size=size)]
            best[size] = min(best.get(size, float("inf")), time.perf_counter() - started)
    print(f"{len(prompts)} prompts, up to {max_new} new tokens, {next(lm.model.parameters()).dtype}, "
          f"{torch.get_num_threads()} threads, best of {args.rounds}")
    print("| rows per batch | seconds | speed against the first | answers equal to the first's |")
    print("| --- | --- | --- | --- |")
    first = sizes[0]
    for size in sizes:
        same = sum(a == b for a, b in zip(texts[size], texts[first]))
        print(f"| {size} | {best[size]:.1f} | {best[first] / best[size]:.2f}x | {same} of {len(prompts)} |")


if __name__ == "__main__":
    main()

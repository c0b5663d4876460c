"""The KL-to-base targets of replay (``train.replay_kl``): the base model's top-k at every answer position of the
replay examples, computed before each training run. One example at a time in fp32 (how they were computed before)
against ``distill.self_targets`` (examples batched by length, the shared template start run once, in bf16 where
the run trains in bf16), on the same examples in one run:

    python bench/bench_self_targets.py [--prompts 128] [--rounds 1]

The examples are the shipped replay prompts with the embedded model's greedy answers, as training builds them (the
answers are made first, 64 rows at a time, and not timed). Prints seconds per form, the speed-up, and how many
positions keep the reference's top-1 token and within what difference of its log-probability.
"""

from __future__ import annotations

import argparse
import time

import torch

from engrain.config import TrainConfig
from engrain.models import answer, answering_lm, load_model
from engrain.train.data import IGNORE, encode_item
from engrain.train.distill import _run_group, first_loss_index, self_targets
from engrain.train.precision import use_bf16
from engrain.train.replay import REPLAY_BATCH, replay_prompts


def one_at_a_time(lm, examples, top_k: int) -> list:
    out = []
    lm.model.eval()
    with torch.no_grad():
        for ex in examples:
            j = first_loss_index(ex.labels, IGNORE)
            out.append(_run_group(lm.model, [(ex.key, ex.ids[:j], ex.ids[j:])], top_k, lm.tokenizer.pad_token_id)[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    cfg = TrainConfig()
    prompts = replay_prompts()[:args.prompts]
    lm = load_model(None, dtype="float32")  # as training loads it
    answers = answer(answering_lm(load_model(None)), prompts, max_new_tokens=cfg.replay_max_new_tokens,
                     batch_size=REPLAY_BATCH)
    examples = [encode_item(lm.tokenizer, {"messages": [{"role": "user", "content": p},
                                                        {"role": "assistant", "content": a.text}]}, f"r{i}", "replay")
                for i, (p, a) in enumerate(zip(prompts, answers))]
    bf16 = use_bf16(cfg.bf16, "cpu")
    forms = {"one at a time, fp32": lambda: one_at_a_time(lm, examples, cfg.distill_top_k),
             "batched, fp32": lambda: self_targets(lm, examples, cfg.distill_top_k, IGNORE, bf16=False)}
    if bf16:
        forms["batched, bf16 autocast (training's default here)"] = \
            lambda: self_targets(lm, examples, cfg.distill_top_k, IGNORE, bf16=True)
    best: dict[str, float] = {}
    got: dict[str, list] = {}
    for _ in range(args.rounds):
        for name, run in forms.items():
            started = time.perf_counter()
            got[name] = run()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)
    tokens = sum(len(ex.ids) for ex in examples)
    print(f"{len(examples)} replay examples, {tokens} tokens, top-{cfg.distill_top_k}, {torch.get_num_threads()} "
          f"threads, bf16 native: {bf16}, best of {args.rounds}")
    print("| form | seconds | speed-up | positions with the reference's top-1 | largest top-1 log-prob difference |")
    print("| --- | --- | --- | --- | --- |")
    ref_name = next(iter(forms))
    ref = got[ref_name]
    for name in forms:
        pairs = [(a, b) for ta, tb in zip(ref, got[name]) for a, b in zip(
            zip(ta.ids, ta.logprobs), zip(tb.ids, tb.logprobs))]
        same = sum(a[0][0] == b[0][0] for a, b in pairs)
        diff = max(abs(a[1][0] - b[1][0]) for a, b in pairs)
        print(f"| {name} | {best[name]:.1f} | {best[ref_name] / best[name]:.2f}x | {same} of {len(pairs)} | "
              f"{diff:.4f} |")


if __name__ == "__main__":
    main()

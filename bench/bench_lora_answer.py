"""What a LoRA memory costs per answered token: the base model, the adapter run beside the base layers (PEFT), and
the adapter folded into a copy of the weights (what ``TrainedMemory`` answers with), side by side in one run.

    python bench/bench_lora_answer.py [--max-new-tokens 48] [--rank 16]

Greedy decoding at batch 1 on the embedded model, the same questions for all three; the adapter is the default
LoRA shape (every linear layer but the head) with random weights, since speed does not depend on what it learned.
Prints tokens/s, each as a ratio to the base model, and whether the merged model's tokens equal the adapter's.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
from peft import PeftModel

from engrain.memory.parametric import LoraKind
from engrain.models import LM, chat_messages, chat_prompt, generate, load_model

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "What does a bee make?",
             "Who wrote Romeo and Juliet?", "Why is the sky blue?", "What is the largest ocean?",
             "How do plants drink water?", "What is the opposite of cold?"]


def tokens_per_s(lm: LM, prompts: list[str], max_new_tokens: int) -> tuple[float, list[str]]:
    generate(lm, prompts[:1], max_new_tokens=4, batch_size=1)  # warm-up
    t0 = time.perf_counter()
    gens = generate(lm, prompts, max_new_tokens=max_new_tokens, batch_size=1)
    return sum(g.completion_tokens for g in gens) / (time.perf_counter() - t0), [g.text for g in gens]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    base = load_model(None, device="cpu", dtype="float32")
    prompts = [chat_prompt(base.tokenizer, chat_messages(q)) for q in QUESTIONS]
    kind = LoraKind()
    trained = kind.attach(copy.deepcopy(base.model), base.tokenizer, {"lora_rank": args.rank}, None)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.002)
    with tempfile.TemporaryDirectory() as folder:  # saved and loaded as a memory is: PEFT's own forward
        trained.save_pretrained(folder)
        adapter = PeftModel.from_pretrained(copy.deepcopy(base.model), folder, is_trainable=False).eval()
    merged = kind.merged_for_answering(copy.deepcopy(adapter)).eval()

    rows = {}
    for label, model in (("base", base.model), ("lora adapter", adapter), ("lora merged", merged)):
        lm = LM(model, base.tokenizer, label, base.path, base.device)
        rows[label] = tokens_per_s(lm, prompts, args.max_new_tokens)
    ref = rows["base"][0]
    print(f"batch 1, greedy, {len(prompts)} questions x up to {args.max_new_tokens} tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"{'':14} {'tok/s':>7} {'vs base':>8}")
    for label, (tps, _) in rows.items():
        print(f"{label:14} {tps:7.1f} {tps / ref:8.2f}")
    same = rows["lora merged"][1] == rows["lora adapter"][1]
    print(f"merged answers equal the adapter's: {same}")


if __name__ == "__main__":
    main()

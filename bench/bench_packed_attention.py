"""The trainer's two ways to attend within packed rows, side by side on this machine's device.

    python bench/bench_packed_attention.py [--steps 5] [--rows 2] [--memories lora,prefix] [--prefix-length 1024]
                                           [--device auto]

A packed training row holds many short synthetic examples; each may attend only to its own earlier tokens (and to a
trained prefix). `engrain.train.kernels.packed_attention` does that either as one SDPA call per example (no wasted scores; many
small calls) or as one SDPA call per row with a block-diagonal causal mask (one call; the whole row x row score
matrix). Which is faster depends on the device and the prefix's length; the trainer picks by `use_one_call`.
This benchmark times a training step (forward, backward, optimizer step, bf16 autocast where the device has it)
both ways, on the architecture of the embedded model (SmolLM2-135M: 30 layers, width 576) built with random
weights: speed does not depend on the weights, so it needs no download and runs the same on a machine with no
model cache. Examples are 30-120 tokens long with the loss on their second half, like `engrain synth` output.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

EMBEDDED_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=100000.0)


def random_examples(n_tokens: int, seed: int = 0) -> list:
    from engrain.train.data import IGNORE, Example

    rng = random.Random(seed)
    examples, total = [], 0
    while total < n_tokens:
        length = rng.randint(30, 120)
        ids = [rng.randrange(100, 49000) for _ in range(length)]
        labels = [IGNORE] * (length // 2) + ids[length // 2:]
        examples.append(Example(ids=ids, labels=labels, key=f"e{len(examples)}"))
        total += length
    return examples


def build(memory: str, device: str, prefix_length: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engrain.config import TrainConfig
    from engrain.memory.parametric import get_kind
    from engrain.memory.prefix import PrefixLM, kv_of_tokens

    torch.manual_seed(0)
    config = LlamaConfig(**EMBEDDED_SHAPE)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(device)
    if memory == "prefix":  # a prefix from random token ids (its init does not change its speed)
        keys, values = kv_of_tokens(model, torch.randint(100, 49000, (prefix_length,)).tolist())
        module = PrefixLM(model, keys, values)
    else:
        module = get_kind(memory).attach(model, None, TrainConfig().model_dump(), None)
    module.train()
    return module


def time_path(module, batches, n_loss: int, device: str, steps: int, one_call: bool) -> float:
    import torch

    from engrain.train.kernels import packed_attention
    from engrain.models import bf16_supported
    from engrain.train.packing import loss_sum

    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    chosen = packed_attention.use_one_call
    packed_attention.use_one_call = lambda *args: one_call
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              enabled=bf16_supported(device))

    def step():
        for batch in batches:
            with autocast:
                s, _ = loss_sum(module, batch, True)
            (s / n_loss).backward()
        opt.step()
        opt.zero_grad()

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    try:
        step()  # warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        return (time.perf_counter() - t0) / steps
    finally:
        packed_attention.use_one_call = chosen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=2, help="packed rows of 1,024 tokens per step")
    ap.add_argument("--memories", default="lora,prefix")
    ap.add_argument("--prefix-length", type=int, default=1024, help="KV positions of the prefix (default 1,024)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    import torch

    from engrain.models import default_device
    from engrain.train.packing import collate, pack

    device = default_device() if args.device == "auto" else args.device
    examples = random_examples(args.rows * 1000)
    rows = pack(examples, 1024)
    batches = [collate([r], 0, True, device) for r in rows]
    tokens = sum(len(e.ids) for e in examples)
    n_loss = sum(e.n_loss for e in examples)
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{name}: {len(examples)} examples, {tokens} tokens in {len(rows)} packed rows; torch {torch.__version__}",
          flush=True)
    print("| memory | per example: s/step | one masked call: s/step | tokens/s (per example -> one call) | "
          "one call x faster |\n|---|---|---|---|---|")
    for memory in [m.strip() for m in args.memories.split(",") if m.strip()]:
        module = build(memory, device, args.prefix_length)
        loop = time_path(module, batches, n_loss, device, args.steps, one_call=False)
        one = time_path(module, batches, n_loss, device, args.steps, one_call=True)
        print(f"| {memory} | {loop:.3f} | {one:.3f} | {tokens / loop:,.0f} -> {tokens / one:,.0f} | {loop / one:.2f} |",
              flush=True)
        del module


if __name__ == "__main__":
    main()

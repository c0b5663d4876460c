"""What each part of the trainer's speed-up buys on the bf16 step, timed alternately in one process on the same
examples: the head fused with the loss or not, short examples' attention in the plain matmul form or SDPA, and (LoRA) each
LoRA layer as one fused function or PEFT's own forward.

    python bench/bench_step_parts.py [KIND] [REPEATS] [--glibc-default]   # KIND: lora (default) or memory

The same 48 synthetic-shaped items as bench_train.py, packed into 1,024-token rows, one optimizer step per timing.
"head off" makes the trainer find no head (the model's own head and cross-entropy run); "plain off" sets the
plain attention's limit to 0 tokens (SDPA for every group); "lora off" gives the LoRA layers PEFT's forward back. Prints the best time of
each variant and its speed-up over all off. The process keeps freed memory as the trainer does
(``train.keep_freed_memory``); ``--glibc-default`` leaves malloc as it is, to measure what that setting buys.
"""
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
from bench_train import make_items
from engrain.config import TrainConfig
from engrain.train.kernels.lora_linear import fuse_lora_layers, unfuse_lora_layers
from engrain.memory.parametric import get_kind
from engrain.models import load_model
from engrain import train as T
from engrain.train.kernels import packed_attention as PA
from engrain.train.loop import bf16_autocast, keep_freed_memory
from engrain.train.packing import collate, loss_sum, pack
from engrain.train.data import encode_item

args = [a for a in sys.argv[1:] if not a.startswith("--")]
kind = args[0] if args else "lora"
repeats = int(args[1]) if len(args) > 1 else 3
if "--glibc-default" not in sys.argv:
    print("keep freed memory:", keep_freed_memory())
lm = load_model(None, device="cpu", dtype="float32"); tok = lm.tokenizer
ex = [encode_item(tok, it, it["id"]) for it in make_items(48)]
packed = pack(ex, 1024)
module = get_kind(kind).attach(lm.model, tok, TrainConfig(lora_rank=16, lora_alpha=32).model_dump(), None); module.train()
has_lora = unfuse_lora_layers(module) > 0  # attach fused them; each variant sets them again
batches = [collate([r], tok.pad_token_id, True, "cpu") for r in packed]
opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
n = sum(e.n_loss for e in ex); tokens = sum(len(e.ids) for e in ex)
real_head_of = T.head_of


def step(head, plain, lora):
    T.head_of = real_head_of if head else (lambda m: None)
    PA.PLAIN_MAX_TOKENS = 512 if plain else 0
    unfuse_lora_layers(module)
    if lora:
        fuse_lora_layers(module)
    t0 = time.perf_counter()
    for b in batches:
        with bf16_autocast("cpu", True):
            s, _ = loss_sum(module, b, True)
        (s / n).backward()
    opt.step(); opt.zero_grad()
    return time.perf_counter() - t0


variants = [(False, False, False), (True, False, False), (False, True, False)]
if has_lora:
    variants.append((False, False, True))
variants.append((True, True, has_lora))
for v in variants:
    step(*v)
res = {v: [] for v in variants}
for _ in range(repeats):
    for v in variants:
        res[v].append(step(*v))
for v, ts in res.items():
    t = min(ts)
    on = "+".join(name for name, x in zip(("head", "plain", "lora"), v) if x) or "none"
    print(f"{on:15} {t:.2f} s/step (min of {len(ts)})  {tokens / t:.0f} tok/s  x{min(res[variants[0]]) / t:.2f}")

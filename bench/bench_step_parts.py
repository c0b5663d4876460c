"""What each part of the trainer's speed-up buys: the bf16 LoRA step with the head fused or not, and short
examples on SDPA's math kernel or not, timed alternately in one process on the same examples.

    python bench/bench_step_parts.py [KIND] [REPEATS]     # KIND: lora (default) or memory; REPEATS: 3

The same 48 synthetic-shaped items as bench_train.py, packed into 1,024-token rows, one optimizer step per timing.
"Fused off" makes the trainer find no head (the model's own head and cross-entropy run); "math off" sets the
math kernel's limit to 0 tokens. Prints the best time of each variant and its speed-up over both off.
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
from engrain.memory.parametric import get_kind
from engrain.models import load_model
from engrain import train as T, packed_attention as PA
from engrain.train import bf16_autocast, collate, encode_item, loss_sum, pack
kind = sys.argv[1] if len(sys.argv) > 1 else "lora"
lm = load_model(None, device="cpu", dtype="float32"); tok = lm.tokenizer
ex = [encode_item(tok, it, it["id"]) for it in make_items(48)]
packed = pack(ex, 1024)
module = get_kind(kind).attach(lm.model, tok, TrainConfig(lora_rank=16, lora_alpha=32).model_dump(), None); module.train()
batches = [collate([r], tok.pad_token_id, True, "cpu") for r in packed]
opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
n = sum(e.n_loss for e in ex); tokens = sum(len(e.ids) for e in ex)
real_head_of = T.head_of
def step(fused, math):
    T.head_of = real_head_of if fused else (lambda m: None)
    PA.MATH_MAX_TOKENS = 256 if math else 0
    t0 = time.perf_counter()
    for b in batches:
        with bf16_autocast("cpu", True):
            s, _ = loss_sum(module, b, True)
        (s / n).backward()
    opt.step(); opt.zero_grad()
    return time.perf_counter() - t0
variants = [(False, False), (True, False), (False, True), (True, True)]
for v in variants: step(*v)
res = {v: [] for v in variants}
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 3):
    for v in variants: res[v].append(step(*v))
for v, ts in res.items():
    t = min(ts)
    print(f"fused={v[0]!s:5} math={v[1]!s:5}  {t:.2f} s/step (min of {len(ts)})  {tokens / t:.0f} tok/s  x{min(res[(False, False)]) / t:.2f}")

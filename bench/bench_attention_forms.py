"""Causal attention forward + backward in three forms, at the example lengths packed rows hold: SDPA's flash kernel,
SDPA's math kernel, and engrain's plain matmul-softmax-matmul form (``packed_attention.plain_attention``).

    python bench/bench_attention_forms.py

SmolLM2-135M's heads (9 query, 3 key/value, 64 dims); each length is a batch of 1,024 // length examples, so every
line is one 1,024-token row's worth of attention. bf16 and fp32, best of 3 runs of 5. The timings behind
``packed_attention.uses_plain_attention``.
"""
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from engrain.train.kernels.packed_attention import plain_attention
from engrain.train.loop import keep_freed_memory

keep_freed_memory()
HQ, HKV, D = 9, 3, 64


def sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return run


FORMS = {"plain": plain_attention, "SDPA flash": sdpa(SDPBackend.FLASH_ATTENTION), "SDPA math": sdpa(SDPBackend.MATH)}


def best_ms(form, length: int, dtype) -> float:
    n = max(1, 1024 // length)
    q = torch.randn(n, HQ, length, D, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(n, HKV, length, D, dtype=dtype, requires_grad=True) for _ in range(2))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(5):
            out = form(q, k, v)
            out.backward(torch.ones_like(out))
        best = min(best, (time.perf_counter() - t0) / 5)
    return best * 1e3


lengths = (32, 128, 256, 512, 1024)
for dtype in (torch.bfloat16, torch.float32):
    print(f"\n{dtype}, ms per 1,024 tokens: " + " ".join(f"{n:>7}" for n in lengths))
    for name, form in FORMS.items():
        print(f"  {name:12}" + " ".join(f"{best_ms(form, n, dtype):7.1f}" for n in lengths), flush=True)

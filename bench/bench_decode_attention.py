"""A decode step's attention: one new query per row against the row's cached keys, SDPA's kernel against engrain's
plain form (``fastgen._plain_attend``: two matmuls around an fp32 softmax), in bf16.

    python bench/bench_decode_attention.py

SmolLM2-135M's heads (9 query, 3 key/value, 64 dims), one layer's call, 1 and 8 rows, cached keys from a short chat
prompt to a retrieval prompt. Microseconds per call, best of 3 runs of 200. The timings behind
``fastgen.DECODE_SDPA_KEYS``: SDPA's kernel only for one row over a short cache.
"""
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from engrain.models.fastgen import DECODE_SDPA_KEYS, _plain_attend, mask_bias

HQ, HKV, D = 9, 3, 64


def best_us(run, repeats: int = 3, calls: int = 200) -> float:
    for _ in range(20):
        run()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            run()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main() -> None:
    print(f"{torch.get_num_threads()} threads, bf16; DECODE_SDPA_KEYS = {DECODE_SDPA_KEYS}")
    print("| rows | cached keys | SDPA (us) | plain (us) | SDPA / plain |")
    print("| --- | --- | --- | --- | --- |")
    with torch.inference_mode():
        for rows in (1, 8):
            for keys in (64, 128, 192, 256, 512, 1024):
                q = torch.randn(rows, HQ, 1, D, dtype=torch.bfloat16)
                k, v = (torch.randn(rows, HKV, keys, D, dtype=torch.bfloat16) for _ in range(2))
                mask = torch.ones(rows, 1, 1, keys, dtype=torch.bool)
                sdpa = best_us(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D ** -0.5,
                                                                      enable_gqa=True))
                bias = mask_bias(mask, q.dtype)  # the decode loop makes it once per step, for all layers
                plain = best_us(lambda: _plain_attend(q, k, v, bias, D ** -0.5))
                print(f"| {rows} | {keys} | {sdpa:.0f} | {plain:.0f} | {sdpa / plain:.2f} |")


if __name__ == "__main__":
    main()

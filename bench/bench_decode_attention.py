"""The decode loop's attention, SDPA's kernel against engrain's plain form (``fastgen._plain_attend``: two matmuls
around an fp32 softmax), in bf16: a decode step (one new query per row against the row's cached keys) and a prefill
(causal, in the plain form's query blocks).

    python bench/bench_decode_attention.py

SmolLM2-135M's heads (9 query, 3 key/value, 64 dims), one layer's call: decode steps of 1 and 8 rows, cached keys
from a short chat prompt to a retrieval prompt; prefills of 1 and 4 prompts of 128 to 571 tokens (a rag prompt of
three chunks). Microseconds per call, best of 3 runs. The timings behind ``fastgen.DECODE_SDPA_KEYS`` (without AMX,
SDPA's kernel only for one row over a short cache) and ``fastgen.amx_attention`` (with AMX tiles, SDPA's kernel at
every shape); the first line says whether this CPU has them.
"""
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from engrain.models.fastgen import DECODE_SDPA_KEYS, _plain_attend, amx_attention, mask_bias

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
    amx = amx_attention(torch.device("cpu"))
    print(f"{torch.get_num_threads()} threads, bf16; AMX tiles: {amx} (SDPA at every shape: {amx}); "
          f"DECODE_SDPA_KEYS = {DECODE_SDPA_KEYS}")
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
        print()
        print("| prefill prompts | tokens | SDPA (us) | plain (us) | SDPA / plain |")
        print("| --- | --- | --- | --- | --- |")
        for rows in (1, 4):
            for tokens in (128, 256, 571):
                q = torch.randn(rows, tokens, HQ, D, dtype=torch.bfloat16).transpose(1, 2)  # as the fused q|k|v
                k, v = (torch.randn(rows, HKV, tokens, D, dtype=torch.bfloat16) for _ in range(2))
                mask = torch.ones(tokens, tokens, dtype=torch.bool).tril()[None, None].expand(rows, 1, -1, -1)
                sdpa = best_us(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D ** -0.5,
                                                                      enable_gqa=True), calls=10)
                bias = mask_bias(mask, q.dtype)
                plain = best_us(lambda: _plain_attend(q, k, v, bias, D ** -0.5), calls=10)
                print(f"| {rows} | {tokens} | {sdpa:.0f} | {plain:.0f} | {sdpa / plain:.2f} |")


if __name__ == "__main__":
    main()

"""Model load time and generation speed of the embedded model, side by side with plain transformers.

    python bench/bench_models.py [--max-new-tokens 64] [--skip-cold] [--repeats 4]

Measures, in one run on this machine:
- load time: cold (fetch-free conversion from the GGUF into a fresh cache) vs cached safetensors, the latter
  both in a running process and in a fresh one (which also pays for importing torch and transformers);
- generated tokens/s at batch 1, 8 and 32 for engrain's ``models.generate`` and for plain
  ``model.generate()`` on the same model, same prompts, greedy. Batch 1 answers 16 questions once; batch 8
  and 32 answer the same 16 four times over, so the batched runs have a queue behind them (engrain refills
  finished rows from it, ``generate()`` runs fixed batches) and every batch size sees the same mix;
- each as a fraction of the compute-bound limit: the machine's fp32 matmul FLOP/s measured here,
  divided by the model's FLOPs per generated token (2 x parameters);
- batch 1 also as a fraction of the weights-bandwidth limit: every generated token reads every weight once, so
  the memory read bandwidth measured here divided by the weights' bytes bounds batch-1 decode.
Prints a table and writes bench/out/models.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from engrain import models

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in one sentence.", "Name three primary colours.",
    "How many days are in a leap year?", "What does a bee make?", "Who wrote Romeo and Juliet?",
    "Describe a cat in a few words.", "What is the boiling point of water in Celsius?",
    "Why is the sky blue?", "List two planets of the solar system.", "What is 12 times 12?",
    "What language is spoken in Brazil?", "Give a synonym for happy.", "What is the largest ocean?",
    "How do plants drink water?", "What is the opposite of cold?",
]


def matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Sustained FLOP/s of a large square matrix product on this machine."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


def read_bandwidth(mb: int = 512, repeats: int = 5) -> float:
    """Sustained bytes/s of reading a tensor far larger than the caches (a sum over it), what batch-1 decode is
    bound by: it reads every weight once per token."""
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    t0 = time.perf_counter()
    for _ in range(repeats):
        x.sum()
    return x.numel() * 4 * repeats / (time.perf_counter() - t0)


def plain_generate(lm, prompts: list[str], max_new_tokens: int, batch_size: int) -> int:
    """What a user would write with transformers alone; returns generated tokens (up to EOS)."""
    tok = lm.tokenizer
    stop = set(models.stop_token_ids(tok))
    total = 0
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                    eos_token_id=sorted(stop))
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            total += next((j for j, t in enumerate(row) if t in stop), len(row))
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--skip-cold", action="store_true", help="skip the cold GGUF conversion")
    parser.add_argument("--repeats", type=int, default=4, help="times each question is asked at batch 8 and 32")
    args = parser.parse_args()

    result: dict = {"max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}

    # Load time: cold (GGUF -> safetensors in a fresh ENGRAIN_HOME) vs cached.
    models.ensure_embedded_model()
    gguf = models.engrain_home() / "downloads" / models.EMBEDDED_GGUF_NAME
    if not args.skip_cold and gguf.exists():
        home = Path(tempfile.mkdtemp(prefix="engrain-bench-"))
        (home / "downloads").mkdir()
        (home / "downloads" / gguf.name).symlink_to(gguf)
        old = os.environ.get("ENGRAIN_HOME")
        os.environ["ENGRAIN_HOME"] = str(home)
        t0 = time.perf_counter()
        models.load_model(None, device="cpu")
        result["load_cold_s"] = time.perf_counter() - t0
        if old is None:
            del os.environ["ENGRAIN_HOME"]
        else:
            os.environ["ENGRAIN_HOME"] = old
        shutil.rmtree(home, ignore_errors=True)
    # Cached load in a fresh process, as `engrain ask` pays it: Python, torch and transformers imports included.
    code = "from engrain import models; models.load_model(None, device='cpu')"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    result["load_cached_fresh_process_s"] = time.perf_counter() - t0
    # Cached load in a running process (a server or notebook reloading the model): imports already done.
    import transformers.models.llama.modeling_llama  # noqa: F401  (the import, not the load, is what it warms)

    t0 = time.perf_counter()
    lm = models.load_model(None, device="cpu")
    result["load_cached_s"] = time.perf_counter() - t0

    params = sum(p.numel() for p in lm.model.parameters())
    flops_per_token = 2 * params
    peak = matmul_flops(torch.float32)
    result.update(params=params, matmul_fp32_gflops=peak / 1e9, matmul_bf16_gflops=matmul_flops(torch.bfloat16, n=512, repeats=1) / 1e9)
    # (bf16 is measured small: without native bf16 (AVX512-BF16/AMX) the CPU emulates it at ~0.1 GFLOP/s.)
    limit_tps = peak / flops_per_token
    result["compute_bound_tokens_per_s"] = limit_tps
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    bandwidth = read_bandwidth()
    result.update(weight_bytes=weight_bytes, read_bandwidth_gb_s=bandwidth / 1e9,
                  bandwidth_bound_batch1_tokens_per_s=bandwidth / weight_bytes)

    rows = []
    # Every batch size answers the same mix of questions (each of the 16 once at batch 1, four times over at
    # batch 8 and 32, so a batch has prompts waiting behind it as a serving or evaluation queue does).
    for batch in (1, 8, 32):
        n_prompts = len(QUESTIONS) * (1 if batch == 1 else args.repeats)
        prompts = [models.chat_prompt(lm.tokenizer, models.chat_messages(QUESTIONS[i % len(QUESTIONS)]))
                   for i in range(n_prompts)]
        t0 = time.perf_counter()
        gens = models.generate(lm, prompts, max_new_tokens=args.max_new_tokens, batch_size=batch)
        ours = sum(g.completion_tokens for g in gens) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        plain_tokens = plain_generate(lm, prompts, args.max_new_tokens, batch)
        plain = plain_tokens / (time.perf_counter() - t0)
        rows.append({"batch": batch, "engrain_tokens_per_s": ours, "plain_generate_tokens_per_s": plain,
                     "engrain_vs_plain": ours / plain, "engrain_fraction_of_compute_bound": ours / limit_tps})
    rows[0]["engrain_fraction_of_bandwidth_bound"] = rows[0]["engrain_tokens_per_s"] / (bandwidth / weight_bytes)
    base = rows[0]["engrain_tokens_per_s"]
    for r in rows:
        r["speedup_vs_batch1"] = r["engrain_tokens_per_s"] / base
    result["generation"] = rows

    print(f"load: cold from GGUF {result.get('load_cold_s', float('nan')):.1f} s, cached {result['load_cached_s']:.2f} s "
          f"(in a fresh process with its imports: {result['load_cached_fresh_process_s']:.1f} s)")
    print(f"matmul peak: fp32 {result['matmul_fp32_gflops']:.0f} GFLOP/s, bf16 {result['matmul_bf16_gflops']:.0f} "
          f"GFLOP/s; model {params / 1e6:.0f}M params -> compute bound {limit_tps:.0f} tokens/s (fp32)")
    print(f"memory read {bandwidth / 1e9:.1f} GB/s over {weight_bytes / 2**20:.0f} MB of weights -> batch-1 bound "
          f"{bandwidth / weight_bytes:.0f} tokens/s; engrain at batch 1 reaches "
          f"{100 * rows[0]['engrain_fraction_of_bandwidth_bound']:.0f}% of it")
    print(f"{'batch':>5} {'engrain tok/s':>14} {'plain tok/s':>12} {'ratio':>6} {'vs batch1':>9} {'% of bound':>10}")
    for r in rows:
        print(f"{r['batch']:>5} {r['engrain_tokens_per_s']:>14.1f} {r['plain_generate_tokens_per_s']:>12.1f} "
              f"{r['engrain_vs_plain']:>6.2f} {r['speedup_vs_batch1']:>9.1f} "
              f"{100 * r['engrain_fraction_of_compute_bound']:>9.1f}%")
    out = Path(__file__).parent / "out" / "models.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

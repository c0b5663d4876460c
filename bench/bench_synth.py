"""Generation speed for synthesis: generated tokens/s with the embedded model, side by side in one run:

  (a) plain transformers generate(), one prompt at a time;
  (b) plain transformers generate(), batched (same batch size as ours);
  (c) engrain's path: models.generate -> fastgen (static KV cache, top-k/top-p sampling, finished rows dropped).

Prompts are real rephrase prompts built from documents (../shared/data/fictional-dev when present, else the
project's examples), sampled like synthesis samples (temperature 0.8, top-p 0.95). Run:

    python bench/bench_synth.py [--threads 2] [--batch 32] [--prompts 32] [--single 4] [--max-new-tokens 96]

Numbers on a shared machine are noisy: compare the ratios, which are measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_prompts(lm, n: int) -> list[str]:
    from engrain.corpus.schema import Chunk, Document
    from engrain.models import chat_prompt
    from engrain.synth import rephrase
    from engrain.synth.base import Unit, document_subject
    from engrain.synth.text import split_sentences

    folder = ROOT.parent / "shared" / "data" / "fictional-dev" / "docs"
    if not folder.is_dir():
        folder = ROOT / "examples"
    files = sorted(p for p in folder.rglob("*") if p.suffix in {".txt", ".md"})
    prompts: list[str] = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        sents = split_sentences(text)
        for i in range(0, len(sents), 4):
            chunk_text = " ".join(sents[i:i + 4])
            doc = Document(id=path.stem, path=str(path), format="txt", text=text, sha256="")
            chunk = Chunk(f"{path.stem}#{i}", path.stem, chunk_text, 0, len(chunk_text), sha256=str(i))
            unit = Unit(chunk, doc, document_subject(doc, chunk))
            for job in rephrase.jobs(unit, [len(prompts) % 5], 0):
                prompts.append(chat_prompt(lm.tokenizer, job.messages))
            if len(prompts) >= n:
                return prompts
    return prompts


def hf_generate(lm, prompts: list[str], batch: int, max_new: int, seed: int) -> int:
    """Plain generate() with left padding; returns the number of generated tokens (up to each row's stop)."""
    import torch

    from engrain.models import stop_token_ids

    tok = lm.tokenizer
    stop = set(stop_token_ids(tok))
    torch.manual_seed(seed)
    total = 0
    for s in range(0, len(prompts), batch):
        enc = tok(prompts[s:s + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = lm.model.generate(**enc, max_new_tokens=max_new, do_sample=True, temperature=0.8, top_p=0.95,
                                    eos_token_id=sorted(stop), pad_token_id=tok.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            n = next((j for j, t in enumerate(row) if t in stop), len(row))
            total += n
    return total


def ours(lm, prompts: list[str], batch: int, max_new: int, seed: int) -> int:
    from engrain.models import generate

    gens = generate(lm, prompts, max_new_tokens=max_new, temperature=0.8, top_p=0.95, batch_size=batch, seed=seed)
    return sum(g.completion_tokens for g in gens)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--single", type=int, default=4, help="prompts for the one-at-a-time baseline")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()

    import torch

    from engrain.models import load_model

    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="cpu")
    prompts = build_prompts(lm, args.prompts)
    rows = []

    def timed(name: str, fn, subset: list[str], batch: int) -> None:
        t0 = time.perf_counter()
        n = fn(lm, subset, batch, args.max_new_tokens, 0)
        dt = time.perf_counter() - t0
        rows.append({"method": name, "prompts": len(subset), "batch": batch, "tokens": n, "seconds": round(dt, 2),
                     "tokens_per_s": round(n / dt, 1)})
        print(f"{name:<34} {n:>6} tokens {dt:>7.1f} s {n / dt:>8.1f} tok/s", flush=True)

    ours(lm, prompts[:2], 2, 4, 0)  # warm-up
    timed("(a) generate(), one at a time", hf_generate, prompts[:args.single], 1)
    timed(f"(b) generate(), batch {args.batch}", hf_generate, prompts, args.batch)
    os.environ["ENGRAIN_FASTGEN"] = "1"
    timed(f"(c) engrain fastgen, batch {args.batch}", ours, prompts, args.batch)
    a, b, c = (r["tokens_per_s"] for r in rows)
    print(f"\nratios: (b)/(a) {b / a:.2f}x   (c)/(a) {c / a:.2f}x   (c)/(b) {c / b:.2f}x   (target (c)/(b) >= 2)")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    result = {"threads": args.threads, "max_new_tokens": args.max_new_tokens, "model": lm.name, "rows": rows,
              "ratio_c_over_b": round(c / b, 2), "ratio_c_over_a": round(c / a, 2),
              "load_average": os.getloadavg()}
    (out / "bench_synth.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'bench_synth.json'}")


if __name__ == "__main__":
    main()

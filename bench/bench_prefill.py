"""Prefill of the embedded model in the decode loop, its attention run in causal query blocks against one block of
all queries, alternately in one process on the same random prompts:

    python bench/bench_prefill.py          # prints a table, writes bench/out/prefill.json

Shapes: one 477-token prompt (a rag prompt's first token) and 16 prompts of 500 tokens (a batch of `engrain
compare`'s rag questions). Then one prompt of 16 to 256 tokens, fitted as a fixed cost per forward plus a cost per
token: the fixed part, in tokens, is how much padding a prefill group may take before a second forward costs more
(``stream.PAD_TOKENS``). Last, the same lengths and the 477-token prompt with the weights packed once for oneDNN
(``packed_weights``, built with the decode weights), in bf16 and in fp32, against the plain weights, alternately,
logits compared; it prints which packing this host takes (``load.prefill_dtype_for``). Best
of ``--repeats`` per form, so a noisy neighbour inflates both forms alike; the logits of the two forms are compared
too (they must agree: the same attention, or the same products, in another order). Then the attention's mask added as
a bias (``fastgen.mask_bias``, the plain form at any length in bf16) against the form before it (``masked_fill`` on
the scores, SDPA past 512 tokens), with the packed weights, alternately, logits compared.
"""
import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from engrain.models import fastgen, load, load_model

OUT = ROOT / "bench" / "out"


def prefill(model, ids: torch.Tensor, quant=None) -> torch.Tensor:
    """The decode loop's own prefill of equal-length prompts (no padding); their last positions' logits. ``quant``:
    the decode weights, whose packed copy (``packed_weights``) the prefill then reads."""
    return fastgen._prefill(model, ids.tolist(), list(range(len(ids))), 0, None, "cpu", quant=quant).logits


def best_of(model, ids: torch.Tensor, block: int, repeats: int, quant=None) -> tuple[float, torch.Tensor]:
    fastgen.QUERY_BLOCK = block
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits = prefill(model, ids, quant)
        times.append(time.perf_counter() - t0)
    return min(times), logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    blocked = fastgen.QUERY_BLOCK
    lm = load_model("embedded")
    model = fastgen.decoder(lm.model)
    print(f"{model.dtype}, {torch.get_num_threads()} threads, query block {blocked}")
    print("| prompts | one block (s) | query blocks (s) | speed-up | logits max diff |")
    print("| --- | --- | --- | --- | --- |")
    generator = torch.Generator().manual_seed(0)
    rows_out = []
    with torch.inference_mode():
        for rows, width in ((1, 477), (16, 500)):
            ids = torch.randint(100, 20000, (rows, width), generator=generator)
            prefill(model, ids)  # warm-up
            whole, ref = best_of(model, ids, 1 << 30, args.repeats)
            split, got = best_of(model, ids, blocked, args.repeats)
            diff = (ref - got).abs().max().item()
            print(f"| {rows} x {width} | {whole:.3f} | {split:.3f} | {whole / split:.2f}x | {diff:.3g} |")
            rows_out.append({"prompts": rows, "tokens": width, "one_block_s": whole, "query_blocks_s": split,
                             "logits_max_diff": diff})
    fastgen.QUERY_BLOCK = blocked
    by_length = cost_by_length(model, generator, args.repeats)
    packing = packed_against_plain(model, generator, args.repeats)
    masking = mask_forms(model, generator, args.repeats)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "prefill.json").write_text(json.dumps(
        {"rows": rows_out, "by_length": by_length, "packed": packing, "mask_forms": masking, "query_block": blocked, "repeats": args.repeats,
         "dtype": str(model.dtype),
         "threads": torch.get_num_threads(), "cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
         "cpu_model": load.cpu_model(),
         "torch": torch.__version__}, indent=2))
    print(f"wrote {OUT / 'prefill.json'}")


def cost_by_length(model, generator, repeats: int) -> dict:
    """Seconds of one prompt's prefill at a few lengths, and the least-squares line through them."""
    lengths = [16, 32, 64, 128, 256]
    seconds = []
    with torch.inference_mode():
        for n in lengths:
            ids = torch.randint(100, 20000, (1, n), generator=generator)
            prefill(model, ids)
            seconds.append(best_of(model, ids, fastgen.QUERY_BLOCK, repeats)[0])
    mean_n, mean_s = sum(lengths) / len(lengths), sum(seconds) / len(seconds)
    per_token = sum((n - mean_n) * (t - mean_s) for n, t in zip(lengths, seconds)) / \
        sum((n - mean_n) ** 2 for n in lengths)
    fixed = mean_s - per_token * mean_n
    print("| prompt tokens | " + " | ".join(map(str, lengths)) + " |")
    print("| --- |" + " --- |" * len(lengths))
    print("| prefill (ms) | " + " | ".join(f"{t * 1000:.0f}" for t in seconds) + " |")
    print(f"fitted: {fixed * 1000:.1f} ms per forward + {per_token * 1000:.2f} ms per token; the fixed part is "
          f"{fixed / per_token:.0f} tokens' worth")
    return {"lengths": lengths, "seconds": seconds, "fixed_s": fixed, "per_token_s": per_token,
            "fixed_in_tokens": fixed / per_token}


def packed_against_plain(model, generator, repeats: int) -> list[dict]:
    """One prompt's prefill through the plain weights and through the layers packed in bf16 and in fp32
    (``load.prefill_dtype_for`` picks one per host), best of ``repeats`` each, alternately; logits against the
    plain weights'."""
    from engrain.models import decode_weights, load, packed_weights

    quant = decode_weights.for_model(model)
    if quant is None or quant.packed is None:
        print(f"no packed weights here (decode weights {getattr(model, decode_weights.ATTRIBUTE, 'model')}, "
              f"packing available: {packed_weights.available()})")
        return []
    forms = {"plain": dataclasses.replace(quant, packed=None),
             "bf16": dataclasses.replace(quant, packed=packed_weights.build(model, torch.bfloat16)),
             "fp32": dataclasses.replace(quant, packed=packed_weights.build(model, torch.float32))}
    chosen = "fp32" if load.prefill_dtype_for("cpu") == "float32" else "bf16"
    print(f"bf16 products at {load.bf16_speedup_cpu():.2f}x fp32's speed here: the layers are packed in {chosen}")
    print("| prompt tokens | plain weights (ms) | packed bf16 (ms) | packed fp32 (ms) | fp32 over bf16 packed | "
          "logits max diff bf16 / fp32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    out = []
    with torch.inference_mode():
        for n in (16, 32, 64, 128, 256, 477):
            ids = torch.randint(100, 20000, (1, n), generator=generator)
            best = dict.fromkeys(forms, float("inf"))
            for form in forms.values():
                prefill(model, ids, form)
            for _ in range(repeats):
                for name, form in forms.items():
                    best[name] = min(best[name], best_of(model, ids, fastgen.QUERY_BLOCK, 1, form)[0])
            ref = prefill(model, ids, forms["plain"])
            diff = {name: (prefill(model, ids, forms[name]) - ref).abs().max().item() for name in ("bf16", "fp32")}
            print(f"| {n} | {best['plain'] * 1000:.0f} | {best['bf16'] * 1000:.0f} | {best['fp32'] * 1000:.0f} | "
                  f"{best['bf16'] / best['fp32']:.2f}x | {diff['bf16']:.3g} / {diff['fp32']:.3g} |")
            out.append({"tokens": n, "plain_s": best["plain"], "packed_s": best["bf16"], "packed_fp32_s": best["fp32"],
                        "logits_max_diff": diff["bf16"], "logits_max_diff_fp32": diff["fp32"]})
    return out


def _masked_fill_attend(q, keys, values, attn_mask, scale: float):
    """The plain attention before ``fastgen.mask_bias``: the scaled scores ``masked_fill``-ed block by block, and
    SDPA for prefills past 512 tokens."""
    import torch.nn.functional as F

    t, s = q.shape[2], keys.shape[2]
    if t > 512:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, scale=scale, enable_gqa=True)
    bsz, heads, _, hd = q.shape
    kv = keys.shape[1]
    out = []
    for a in range(0, t, fastgen.QUERY_BLOCK):
        qb, end = q[:, :, a:a + fastgen.QUERY_BLOCK], s - t + a + fastgen.QUERY_BLOCK
        n = qb.shape[2]
        scores = torch.matmul(qb.reshape(bsz, kv, heads // kv * n, hd), keys[:, :, :end].transpose(2, 3)) * scale
        allowed = attn_mask[:, :, a:a + n, :end]
        scores = scores.view(bsz, kv, heads // kv, n, -1).masked_fill(~allowed[:, :, None], torch.finfo(q.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        out.append(torch.matmul(probs.view(bsz, kv, heads // kv * n, -1), values[:, :, :end]).view(bsz, heads, n, hd))
    return torch.cat(out, dim=2)


def mask_forms(model, generator, repeats: int) -> list[dict]:
    """Prefill with the mask as a bias (now) and with ``masked_fill`` and SDPA past 512 tokens (before), best of
    ``repeats`` each, alternately, through the packed weights where the model has them."""
    from engrain.models import decode_weights

    quant = decode_weights.for_model(model)
    now = (fastgen._plain_attend, fastgen.mask_bias)
    before = (_masked_fill_attend, lambda allowed, dtype: allowed)  # the boolean mask, passed on as it is

    def use(forms) -> None:
        fastgen._plain_attend, fastgen.mask_bias = forms

    print("| prompts | masked_fill, SDPA past 512 (s) | mask as a bias (s) | speed-up | logits max diff |")
    print("| --- | --- | --- | --- | --- |")
    out = []
    with torch.inference_mode():
        for rows, n in ((1, 477), (1, 800), (4, 800)):
            ids = torch.randint(100, 20000, (rows, n), generator=generator)
            best, logits = {"before": float("inf"), "now": float("inf")}, {}
            for _ in range(repeats):
                for name, forms in (("before", before), ("now", now)):
                    use(forms)
                    t, logits[name] = best_of(model, ids, fastgen.QUERY_BLOCK, 1, quant)
                    best[name] = min(best[name], t)
            use(now)
            diff = (logits["before"] - logits["now"]).abs().max().item()
            print(f"| {rows} x {n} | {best['before']:.3f} | {best['now']:.3f} | {best['before'] / best['now']:.2f}x | "
                  f"{diff:.3g} |")
            out.append({"prompts": rows, "tokens": n, "before_s": best["before"], "now_s": best["now"],
                        "logits_max_diff": diff})
    return out


if __name__ == "__main__":
    main()

"""Training speed of each parametric memory, side by side with a plain PEFT + transformers step, and MFU.

    python bench/bench_train.py [--model SPEC] [--steps 4] [--items 48] [--memories lora,full,prefix,memory_layer]

In one run, on the same examples (chat items with answer-only loss and plain text items, like `engrain synth`
output):
- the machine's matmul peak: torch.mm on 2,048 x 2,048 matrices into a preallocated output, fp32 and bf16;
- baseline: a plain fp32 PEFT LoRA step as most scripts write it: right-padded batch, model(**batch).loss,
  backward, AdamW step;
- engrain's trainer step for each memory (`engrain.train.packing.loss_sum` on packed rows, one row per forward with the
  gradients accumulated: no padding, each example's attention block computed alone, logits only where a loss is
  taken, the head fused with the loss a slice of positions at a time, each LoRA layer one fused function, and
  malloc keeping freed memory as `engrain train` sets it), in fp32 and, where the CPU has native bf16, under bf16
  autocast (the trainer's default where bf16 products also measure faster than fp32's; the output says which).
Tokens/s counts real (non-padding) tokens. MFU = achieved FLOP/s / measured fp32 matmul peak, with FLOPs per token
= 2 x body params forward + (4 or 2) x body params backward (weights trained or frozen) + the output head on the
positions where logits are computed; attention FLOPs are left out (small at these lengths, and the baseline's
padded rows and engrain's per-example blocks are about as long).
Each row is measured in its own fresh process (one warm-up step, then the mean of --steps steps), so none inherits
another's heap. Writes bench/out/bench_train.json. Numbers on a shared 2-core machine are noisy: compare ratios
within one run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def matmul_peak(dtype, n: int = 2048, reps: int = 3) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    c = torch.empty(n, n, dtype=dtype)  # written in place: the time of the multiply, not of fresh memory
    torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def make_items(n: int, seed: int = 0) -> list[dict]:
    """Items shaped like synthetic data: 2/3 question/answer chats, 1/3 text passages, varied lengths."""
    rng = random.Random(seed)
    words = ("archive vault harbour council treaty engine river signal beacon ledger orbit canal charter "
             "festival quarry mill tower bridge market garden").split()
    items = []
    for i in range(n):
        sent = lambda k: " ".join(rng.choice(words) for _ in range(k)).capitalize() + "."  # noqa: E731
        if i % 3 == 2:
            items.append({"id": f"t{i}", "text": " ".join(sent(rng.randint(8, 20)) for _ in range(rng.randint(2, 6)))})
        else:
            items.append({"id": f"q{i}", "messages": [
                {"role": "user", "content": sent(rng.randint(6, 18)).rstrip(".") + "?"},
                {"role": "assistant", "content": sent(rng.randint(4, 24))}]})
    return items


def flops_per_token(model, trained_body: bool) -> tuple[float, float]:
    """(body FLOPs per token, output-head FLOPs per logit position) for forward + backward."""
    head = model.get_output_embeddings().weight
    emb = model.get_input_embeddings().weight
    body = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) - emb.numel()
    if head.data_ptr() != emb.data_ptr():
        body -= head.numel()
    bwd = 4 if trained_body else 2
    return (2 + bwd) * body, (2 + 2) * head.numel()


def time_steps(step, steps: int) -> float:
    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def examples_for(args, tok):
    from engrain.train.data import encode_item

    return [encode_item(tok, it, it["id"]) for it in make_items(args.items)]


def measure_baseline(args, peaks: tuple[float, float]) -> dict:
    """A plain PEFT + transformers step: right-padded batch, loss from model(**batch), fp32."""
    import torch
    from peft import LoraConfig, get_peft_model

    from engrain.memory.parametric import all_linear_names
    from engrain.models import load_model
    from engrain.train.data import IGNORE

    torch.manual_seed(0)
    lm = load_model(args.model, device="cpu", dtype="float32")
    tok, examples = lm.tokenizer, examples_for(args, lm.tokenizer)
    peft_model = get_peft_model(lm.model, LoraConfig(r=16, lora_alpha=32, target_modules=all_linear_names(lm.model),
                                                     task_type="CAUSAL_LM"))
    peft_model.train()
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), tok.pad_token_id)
    labels = torch.full((len(examples), width), IGNORE)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e.ids)], labels[i, :len(e.ids)], mask[i, :len(e.ids)] = (torch.tensor(e.ids),
                                                                            torch.tensor(e.labels), 1)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)

    def baseline_step():
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    sec = time_steps(baseline_step, args.steps)
    body, head = flops_per_token(peft_model, trained_body=False)
    flops = body * ids.numel() + head * ids.numel()  # padded positions are computed too
    real_tokens = sum(len(e.ids) for e in examples)
    return {"method": "baseline peft fp32 (padded)", "tokens_per_s": real_tokens / sec, "seconds_per_step": sec,
            "mfu_fp32": flops / sec / peaks[0], "mfu_bf16": flops / sec / peaks[1], "padded_width": width,
            "real_tokens": real_tokens}


def measure_memory(args, peaks: tuple[float, float], name: str, bf16: bool) -> dict:
    """engrain's trainer step for one memory, set up as `engrain train` sets it up."""
    import torch

    from engrain.config import TrainConfig
    from engrain.memory.parametric import get_kind
    from engrain.models import load_model
    from engrain.train.loop import bf16_autocast, keep_freed_memory
    from engrain.train.packing import collate, loss_sum, pack, unpacked_rows

    keep_freed_memory()  # what `engrain train` does first
    torch.manual_seed(0)
    lm = load_model(args.model, device="cpu", dtype="float32")
    tok, model, examples = lm.tokenizer, lm.model, examples_for(args, lm.tokenizer)
    kind = get_kind(name)
    kind_cfg = TrainConfig(lora_rank=16, lora_alpha=32, seq_len=args.seq_len).model_dump()
    if name == "prefix":  # no corpus in this benchmark; the prefix's init does not change its speed
        kind_cfg["options"] = {"prefix": {"init": "random_tokens"}}
    module = kind.attach(model, tok, kind_cfg, None)
    module.train()
    packing = bool(getattr(kind, "packing", True))
    # One row per forward, gradients accumulated over the rows, one optimizer step: the trainer's loop with
    # micro_batch 1 (rows are not padded, so nothing but real tokens is computed).
    rows_in = pack(examples, args.seq_len) if packing else unpacked_rows(examples, args.seq_len)
    batches = [collate([r], tok.pad_token_id, packing, "cpu") for r in rows_in]
    params = [p for p in module.parameters() if p.requires_grad]
    make_opt = getattr(kind, "make_optimizer", None)
    opt = make_opt(module, 1e-4, 0.0) if make_opt else torch.optim.AdamW(params, lr=1e-4)
    hook = getattr(kind, "sparse_grad_hook", None)
    n_loss = sum(e.n_loss for e in examples)

    def step():
        for batch in batches:
            with bf16_autocast("cpu", bf16):
                s, _ = loss_sum(module, batch, packing)
            (s / n_loss).backward()
        if hook:
            hook(module)
        opt.step()
        opt.zero_grad()

    sec = time_steps(step, args.steps)
    body, head = flops_per_token(model, trained_body=(name == "full"))
    flops = body * sum(b["input_ids"].numel() for b in batches) + head * n_loss
    return {"method": f"engrain {name} (packed{', bf16 autocast' if bf16 else ''})",
            "tokens_per_s": sum(len(e.ids) for e in examples) / sec, "seconds_per_step": sec,
            "mfu_fp32": flops / sec / peaks[0], "mfu_bf16": flops / sec / peaks[1],
            "trainable_params": sum(p.numel() for p in params), "packed_rows": len(batches)}


def in_fresh_process(fn, *fn_args):
    """Run one measurement in a new interpreter: what one ran before (the baseline's gigabyte of padded logits,
    the allocator setting engrain's rows make) must not change the next one's time."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, fn_args)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--memories", default="lora,full,prefix,memory_layer")
    args = ap.parse_args()

    import torch

    from engrain.memory.parametric import get_kind
    from engrain.models import bf16_supported
    from engrain.train.loop import use_bf16

    peaks = (matmul_peak(torch.float32), matmul_peak(torch.bfloat16))  # bf16 is emulated (slow) without native
    print(f"matmul peak: fp32 {peaks[0] / 1e9:.1f} GFLOP/s, bf16 {peaks[1] / 1e9:.1f} GFLOP/s "
          f"(torch threads {torch.get_num_threads()})", flush=True)
    rows = [in_fresh_process(measure_baseline, args, peaks)]
    print(rows[-1], flush=True)
    for name in [m.strip() for m in args.memories.split(",") if m.strip()]:
        try:
            get_kind(name)
        except Exception as exc:  # a memory whose module is not there yet
            print(f"skip {name}: {exc}", flush=True)
            continue
        # fp32, and bf16 autocast where the CPU has native bf16 (the trainer's train.bf16 auto takes it only where its
        # products measure faster than fp32's: the last line says which it takes here)
        for bf16 in (False, True) if bf16_supported("cpu") else (False,):
            rows.append(in_fresh_process(measure_memory, args, peaks, name, bf16))
            print(rows[-1], flush=True)

    base = rows[0]["tokens_per_s"]
    real_tokens = rows[0]["real_tokens"]
    print(f"\n{real_tokens} real tokens per step ({args.items} examples, padded width {rows[0]['padded_width']}, "
          f"{rows[-1]['packed_rows']} packed rows of {args.seq_len}); each row measured in its own process")
    print("| method | tokens/s | x baseline | MFU vs fp32 peak | MFU vs bf16 peak |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f} | "
              f"{100 * r['mfu_fp32']:.1f}% | {100 * r['mfu_bf16']:.1f}% |")
    print(f"the trainer's train.bf16 auto on this CPU: {'bf16 autocast' if use_bf16('auto', 'cpu') else 'fp32'}")
    out = ROOT / "bench" / "out" / "bench_train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from engrain.models import cpu_model

    out.write_text(json.dumps({"cpu": cpu_model(), "peak_fp32_flops": peaks[0], "peak_bf16_flops": peaks[1],
                               "real_tokens": real_tokens,
                               "steps": args.steps, "items": args.items, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

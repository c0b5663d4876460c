"""Would int8 products (W8A8) make a CPU prefill faster than the packed bf16 weights, and at what cost in accuracy?
A few minutes on a CPU.

    python bench/exp_int8_prefill.py [--repeats 12] [--alpha 0.5]

The hypothesis: a prefill is bound by its linear layers (``docs/performance.md``: about three quarters of a rag
prompt's prefill), and a CPU with AVX512-VNNI multiplies int8 at about twice its bf16 rate, so int8 products should
prefill rag prompts faster. Each linear layer becomes an int8 weight (one scale per output row) times its input
quantized per token to int8 (one scale per token, taken at run time), through ``torch._int_mm``; the quantizing and
the rescaling around it are one ``torch.compile``-d function. SmoothQuant (Xiao et al. 2023) moves the inputs'
outlier channels into the weights first: each input channel is divided by ``amax_x ** alpha / amax_w ** (1 -
alpha)``, the weight's column multiplied by it, ``amax_x`` measured on the replay prompts engrain ships.

Prints: the products alone at a rag prompt's shapes (packed bf16 against int8); the decode loop's own prefill
(``fastgen._prefill``, the model's 4-bit decode weights' packed copy against the same with int8 products), best of
``--repeats`` each, alternately, and how often the two agree on the next token; and the perplexity of the package's
general text (`engrain compare`'s forgetting measure) through the model with every linear layer in bf16, int8 without smoothing and int8 with it (one
module at a time there, not the fused products). Writes ``bench/out/int8_prefill.json``. Needs a CPU whose oneDNN
computes bf16 natively (the packed weights' condition).
"""

from __future__ import annotations

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
from engrain.evaluate.forgetting import general_text, perplexity  # noqa: E402
from engrain.models import decode_weights, fastgen, load_model, packed_weights  # noqa: E402

OUT = ROOT / "bench" / "out"
NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _int8_product(x, inv_smooth, weight, scale):
    x = x.float() * inv_smooth
    step = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
    q = (x / step).round().to(torch.int8)
    return (torch._int_mm(q, weight).float() * step * scale).to(torch.bfloat16)


_compiled = torch.compile(_int8_product, dynamic=True)


@dataclasses.dataclass
class Int8Product:
    """``x @ W.T`` as int8 x int8: W (in, out) int8 with one scale per output, x quantized per token."""

    weight: torch.Tensor
    scale: torch.Tensor
    inv_smooth: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return _compiled(flat, self.inv_smooth, self.weight, self.scale).view(*x.shape[:-1], -1)


def linear_modules(model) -> list[torch.nn.Linear]:
    """The projections of every block of a Llama model."""
    return [getattr(part, name) for layer in model.model.layers for part in (layer.self_attn, layer.mlp)
            for name in NAMES if hasattr(part, name)]


def input_amax(model, ids: torch.Tensor) -> dict:
    """Per linear module, the largest magnitude each input channel took over ``ids``."""
    amax = {}

    def hook(mod, args):
        a = args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).amax(0)
        amax[mod] = torch.maximum(amax[mod], a) if mod in amax else a

    hooks = [m.register_forward_pre_hook(hook) for m in linear_modules(model)]
    with torch.inference_mode():
        for i in range(0, ids.shape[1], 512):
            model(ids[:, i:i + 512])
    for h in hooks:
        h.remove()
    return amax


def int8_product(modules, amax: torch.Tensor | None, alpha: float) -> Int8Product:
    """The modules' weights stacked (outputs side by side) as one int8 product; smoothed where ``amax`` is given."""
    w = torch.cat([m.weight.detach().float() for m in modules])
    smooth = torch.ones(w.shape[1])
    if amax is not None:
        smooth = amax.clamp_min(1e-5) ** alpha / w.abs().amax(0).clamp_min(1e-5) ** (1 - alpha)
    w = w * smooth
    scale = w.abs().amax(1).clamp_min(1e-8) / 127
    return Int8Product((w / scale[:, None]).round().to(torch.int8).t().contiguous(), scale, 1 / smooth)


def perplexity_int8(model, tokenizer, amax: dict | None, alpha: float) -> float:
    """The general text's perplexity (as `engrain compare` measures forgetting) with every linear layer of the
    blocks run as an int8 product (its own, unfused)."""
    saved = []
    for m in linear_modules(model):
        saved.append((m, m.forward))
        m.forward = int8_product([m], amax[m] if amax is not None else None, alpha)
    try:
        return perplexity(model, tokenizer, general_text())
    finally:
        for m, forward in saved:
            m.forward = forward


def best_pair(run_a, run_b, repeats: int) -> tuple[float, float]:
    run_a(), run_b()  # warm-up (and the compile)
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, run in enumerate((run_a, run_b)):
            t0 = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant's migration strength")
    args = ap.parse_args()
    if not packed_weights.available():
        sys.exit("this CPU's oneDNN does not compute bf16 natively: no packed weights to compare against")
    lm = load_model("embedded")
    model, tok = fastgen.decoder(lm.model), lm.tokenizer
    data = ROOT / "src" / "engrain" / "data"
    calibration = tok((data / "replay_prompts.txt").read_text(), return_tensors="pt").input_ids[:, :2048]
    amax = input_amax(model, calibration)
    print(f"{model.dtype}, {torch.get_num_threads()} threads, alpha {args.alpha}")

    print("| product (tokens x in x out) | packed bf16 (ms) | int8 (ms) | speed-up |")
    print("| --- | --- | --- | --- |")
    products = []
    layer = model.model.layers[0]
    a, m = layer.self_attn, layer.mlp
    with torch.inference_mode():
        for mods in ([a.q_proj, a.k_proj, a.v_proj], [a.o_proj], [m.gate_proj, m.up_proj], [m.down_proj]):
            x = torch.randn(477, mods[0].in_features).to(torch.bfloat16)
            packed, int8 = packed_weights.pack(*mods), int8_product(mods, amax[mods[0]], args.alpha)
            tp, ti = best_pair(lambda: packed(x), lambda: int8(x), args.repeats)
            shape = f"477 x {mods[0].in_features} x {sum(p.out_features for p in mods)}"
            print(f"| {shape} | {tp * 1e3:.2f} | {ti * 1e3:.2f} | {tp / ti:.2f}x |")
            products.append({"shape": shape, "packed_s": tp, "int8_s": ti})

    quant = decode_weights.for_model(model)
    blocks = [packed_weights.PackedBlock(
        int8_product([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj], amax[l.self_attn.q_proj], args.alpha),
        int8_product([l.self_attn.o_proj], amax[l.self_attn.o_proj], args.alpha),
        int8_product([l.mlp.gate_proj, l.mlp.up_proj], amax[l.mlp.gate_proj], args.alpha),
        int8_product([l.mlp.down_proj], amax[l.mlp.down_proj], args.alpha)) for l in model.model.layers]
    int8_quant = dataclasses.replace(quant, packed=blocks)

    def prefill(ids, q):
        return fastgen._prefill(model, ids.tolist(), list(range(len(ids))), 0, None, "cpu", quant=q).logits

    print("| prefill (prompts x tokens) | packed bf16 (s) | int8 (s) | speed-up | next token agrees |")
    print("| --- | --- | --- | --- | --- |")
    generator = torch.Generator().manual_seed(0)
    prefills = []
    with torch.inference_mode():
        for rows, width in ((1, 64), (1, 477), (16, 500)):
            ids = torch.randint(100, 20000, (rows, width), generator=generator)
            tp, ti = best_pair(lambda: prefill(ids, quant), lambda: prefill(ids, int8_quant), args.repeats)
            agree = (prefill(ids, quant).argmax(-1) == prefill(ids, int8_quant).argmax(-1)).float().mean().item()
            print(f"| {rows} x {width} | {tp:.3f} | {ti:.3f} | {tp / ti:.2f}x | {agree:.2f} |")
            prefills.append({"prompts": rows, "tokens": width, "packed_s": tp, "int8_s": ti, "agree": agree})

    ppl = {"bf16": perplexity(model, tok, general_text()), "int8": perplexity_int8(model, tok, None, args.alpha),
           "int8_smoothed": perplexity_int8(model, tok, amax, args.alpha)}
    print(f"perplexity of the general text: bf16 {ppl['bf16']:.3f}, int8 "
          f"{ppl['int8']:.3f} (x{ppl['int8'] / ppl['bf16']:.3f}), int8 smoothed {ppl['int8_smoothed']:.3f} "
          f"(x{ppl['int8_smoothed'] / ppl['bf16']:.3f})")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "int8_prefill.json").write_text(json.dumps(
        {"products": products, "prefills": prefills, "perplexity": ppl, "alpha": args.alpha,
         "repeats": args.repeats, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
         "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}, indent=2))
    print(f"wrote {(OUT / 'int8_prefill.json').relative_to(ROOT)}")


if __name__ == "__main__":
    main()

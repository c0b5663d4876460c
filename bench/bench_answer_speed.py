"""How fast engrain answers, against its fp32 reference path and against llama.cpp on the same model, in one run.

    python bench/bench_answer_speed.py [--max-new-tokens 48] [--clients 8] [--seconds 20] [--skip-llama]
        [--llama-extra-bufts] [--rag-top-k K] [--rag-chunk-tokens N]

Side by side on this machine, greedy decoding, the embedded SmolLM2-135M-Instruct:

- batch-1 decode of the base model (tokens/s over 8 questions), and its share of the weights-bandwidth limit: every
  generated token reads every weight once, so the read bandwidth measured here divided by the weights' bytes bounds
  batch-1 decode;
- batch-1 decode of a LoRA memory merged into its copy of the weights (what ``TrainedMemory`` and ``engrain serve``
  answer with), as a ratio to base; the adapter has random weights (speed does not depend on what it learned);
- first token for a retrieval-sized prompt (about 460 tokens: acme chunks in view, as rag asks), retrieval left out;
- ``engrain serve`` under N concurrent clients, 24-token answers, base and rag in turn: requests/s; and rag again
  with ``--reuse-chunks`` (retrieved chunks' KV reused wherever they come back, approximate attention: what it does to
  answers is measured by ``experiments/answering/reuse_chunks.py``); with ``--rag-top-k K``, rag once more with K
  chunks in its prompts instead of the default ``rag.top_k`` (what the prompt's length costs under load; what the
  number of chunks does to answers is experiments/retrieval's); with ``--rag-chunk-tokens N``, rag once more from a
  second workspace of the same documents chunked in N tokens (``ingest.chunk_tokens``, an eighth of it overlapping);
- the same for llama.cpp (``llama-cpp-python``, on PyPI, built from source here) on the GGUF the embedded model is
  converted from, and its OpenAI-compatible server under the same clients, when the package is installed.

Columns: "fp32" is engrain's reference path (weights in float32, decoding with them), "engrain" the default
(``model.dtype: auto``: bfloat16 where the CPU computes it natively; ``model.decode_weights: auto``: decode steps read
a quantized copy of the linear layers, 4-bit groups where the weights are 4-bit already and int8 rows elsewhere,
``models/decode_weights.py``). The linear layers' time per step at 1 to 32 rows, own weights against the quantized
copy, is printed below the table: where the copy stops paying sets ``decode_weights.MAX_ROWS``.
Prints one table and writes bench/out/answer_speed.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import read_bandwidth  # noqa: E402
from bench_serve import (EXAMPLE, KEY, OUT, build_workspace, free_port, indexed_workspace, load,  # noqa: E402
                         wait_healthy)

from engrain.config import IngestConfig, RagConfig, apply_settings, load_config  # noqa: E402
from engrain.memory.parametric import LoraKind  # noqa: E402
from engrain.models import LM, chat_messages, chat_prompt, cpu_model, decode_weights, generate, load_model  # noqa: E402
from engrain.models.load import prefill_dtype_for  # noqa: E402
from engrain.models.fetch import EMBEDDED_GGUF_NAME  # noqa: E402
from engrain.home import engrain_home  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "What does a bee make?",
             "Who wrote Romeo and Juliet?", "Why is the sky blue?", "What is the largest ocean?",
             "How do plants drink water?", "What is the opposite of cold?"]
PROMPT_TOKENS = 460  # the length of the rag prompt the first-token target was set on (four chunks then, on acme)


def decode_rate(lm: LM, prompts: list[str], max_new_tokens: int) -> float:
    """Generated tokens/s at batch 1, one prompt after another (after a warm-up)."""
    generate(lm, prompts[:1], max_new_tokens=4, batch_size=1)
    t0 = time.perf_counter()
    gens = [generate(lm, [p], max_new_tokens=max_new_tokens, batch_size=1)[0] for p in prompts]
    return sum(g.completion_tokens for g in gens) / (time.perf_counter() - t0)


def long_prompt(tokenizer) -> str:
    """A chat prompt with about PROMPT_TOKENS tokens of acme's documents in view, as rag builds it."""
    text = " ".join(p.read_text(encoding="utf-8") for p in sorted((EXAMPLE / "docs").glob("*.md")))
    words = text.split()
    for n in range(50, len(words), 10):
        prompt = chat_prompt(tokenizer, chat_messages("Who founded the company?", " ".join(words[:n])))
        if len(tokenizer(prompt)["input_ids"]) >= PROMPT_TOKENS:
            return prompt
    return prompt


def first_token_s(run_once, repeats: int = 3) -> float:
    run_once()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_once()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def merged_lora(lm: LM) -> LM:
    kind = LoraKind()
    model = kind.attach(copy.deepcopy(lm.model).float(), lm.tokenizer, {}, None)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.002)
    merged = kind.merged_for_answering(model).to(next(lm.model.parameters()).dtype).eval()
    return LM(merged, lm.tokenizer, lm.name + "+lora", lm.path, lm.device)


def _timed(run, repeats: int = 10) -> float:
    """ms per call, after one warm-up call."""
    run()
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - t0) / repeats * 1000


def _bytes(q) -> int:
    return sum(t.numel() * t.element_size() for t in vars(q).values())


def linear_floor(model, mode: str, rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32)) -> dict:
    """ms per decode step of the model's linear layers alone (every weight matrix, head included) at a few rows per
    step: with the model's own weights, and with the quantized weights the decode loop reads in ``mode``
    (``decode_weights.build``: q|k|v and gate|up fused). The floor a decode step sits on, and where the quantized
    copy stops paying (``MAX_ROWS``)."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    dtype = weights[0].dtype
    plan = decode_weights.build(model, mode)
    quant = [(q, w.shape[1]) for b, layer in zip(plan.blocks, model.model.layers)
             for q, w in ((b.qkv, layer.self_attn.q_proj.weight), (b.o, layer.self_attn.o_proj.weight),
                          (b.gate_up, layer.mlp.gate_proj.weight), (b.down, layer.mlp.down_proj.weight))]
    quant.append((plan.head, model.lm_head.weight.shape[1]))
    out = {"rows": {}, "bytes": sum(w.numel() * w.element_size() for w in weights),
           "quant_bytes": sum(_bytes(q) for q, _ in quant), "mode": mode,
           "kinds": sorted({type(q).__name__ for q, _ in quant})}
    with torch.inference_mode():
        for n in rows:
            xs = {w.shape[1]: torch.randn(n, w.shape[1], dtype=dtype) for w in weights}
            own = _timed(lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in weights])
            fast = _timed(lambda: [q(xs[inputs]) for q, inputs in quant])
            out["rows"][n] = {"own_ms": own, "quant_ms": fast}
    one = out["rows"][rows[0]]
    out.update(ms=one["own_ms"], quant_ms=one["quant_ms"], gb_s=out["bytes"] / one["own_ms"] / 1e6,
               quant_gb_s=out["quant_bytes"] / one["quant_ms"] / 1e6)
    return out


def in_process(dtype: str, max_new_tokens: int, bandwidth: float) -> dict:
    lm = load_model(None, device="cpu", dtype=dtype)
    prompts = [chat_prompt(lm.tokenizer, chat_messages(q)) for q in QUESTIONS]
    weights = sum(p.numel() * p.element_size() for p in lm.model.parameters())  # the tied head counted once
    base = decode_rate(lm, prompts, max_new_tokens)
    mode = getattr(lm.model, decode_weights.ATTRIBUTE)
    own = None
    quantized = mode in decode_weights.QUANTIZED
    if quantized:  # the same model decoding with its own weights: what the quantized copy buys
        setattr(lm.model, decode_weights.ATTRIBUTE, "model")
        own = decode_rate(lm, prompts, max_new_tokens)
        setattr(lm.model, decode_weights.ATTRIBUTE, mode)
    linears = linear_floor(lm.model, mode) if quantized else linear_floor(lm.model, "int8", (1,))
    step_bytes = linears["quant_bytes"] if quantized else weights
    lora = decode_rate(merged_lora(lm), prompts, max_new_tokens)
    prompt = long_prompt(lm.tokenizer)
    first = first_token_s(lambda: generate(lm, [prompt], max_new_tokens=1, batch_size=1))
    return {"dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."), "weights_mb": weights / 1e6,
            "decode_weights": mode, "step_mb": step_bytes / 1e6, "decode_base_own_weights": own,
            "decode_base": base, "decode_lora": lora, "limit": bandwidth / step_bytes,
            "first_token_s": first, "prompt_tokens": len(lm.tokenizer(prompt)["input_ids"]),
            "linears": linears}


def serve_load(command: list[str], models: list[str], clients: int, seconds: float, name: str) -> dict:
    """Start a server, put each model under ``clients`` concurrent clients for ``seconds``, stop it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = OUT / f"answer-speed-{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command + ["--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, proc, log)
            questions = [json.loads(x)["question"] for x in (EXAMPLE / "questions.jsonl").read_text().splitlines()]
            out = {}
            for m in models:
                before = worker_counts(url)
                out[m] = load(url, [m], questions, clients, seconds, 24)
                after = worker_counts(url)
                for part in after:
                    out[m][part] = {k: round(after[part][k] - before[part][k], 3) for k in after[part]}
            return out
        finally:
            proc.terminate()
            proc.wait(120)


def worker_counts(url: str) -> dict[str, dict[str, float]]:
    """The server's worker time by part so far and what its prefill computed (``/health``'s ``worker_seconds`` and
    ``prefill_tokens``); none for a server that does not report them (llama.cpp's)."""
    r = httpx.get(url + "/health", timeout=30)  # liveness needs no key
    health = r.json() if r.status_code == 200 else {}
    return {k: health[k] for k in ("worker_seconds", "prefill_tokens") if k in health}


def worker_shares(load_result: dict) -> str:
    """Where the server's worker spent a load test's wall time, as shares of it, and its prefill's time per token
    computed (prompt tokens after reused KV, padding not counted) with the padding's share of the tokens."""
    spent, wall = load_result["worker_seconds"], load_result["seconds"]
    parts = [f"{k} {spent[k] / wall:.0%}" for k in ("retrieval", "prefill", "decode", "other")]
    text = ", ".join(parts) + f", waiting {max(0.0, 1 - spent['busy'] / wall):.0%}"
    computed = load_result.get("prefill_tokens")
    if computed and computed["tokens"]:
        text += (f"; prefill {1000 * spent['prefill'] / computed['tokens']:.2f} ms per token over "
                 f"{computed['requests']:.0f} requests admitted ({computed['tokens'] / computed['requests']:.0f} "
                 f"tokens each, padding {computed['padding'] / computed['tokens']:.0%} more)")
    return text


def configure(ws: Path, dtype: str, top_k: int, prefill_dtype: str = "auto") -> None:
    """The served workspace's model dtype, prefill dtype and rag chunk count, written into its engrain.yaml."""
    settings = OUT / "answer-speed-settings.yaml"
    settings.write_text(f"model:\n  dtype: {dtype}\n  prefill_dtype: {prefill_dtype}\nrag:\n  top_k: {top_k}\n")
    apply_settings(ws / "engrain.yaml", settings)


def serve_command(ws: Path) -> list[str]:
    return [sys.executable, "-c", "from engrain.cli import main; main()", "serve", "-w", str(ws), "--api-key", KEY]


def chunked_workspace(chunk_tokens: int) -> Path:
    """The example corpus ingested in chunks of ``chunk_tokens`` and indexed (kept in bench/out/serve-ws)."""
    config = IngestConfig(chunk_tokens=chunk_tokens, chunk_overlap=chunk_tokens // 8)
    return indexed_workspace(OUT / "serve-ws" / f"acme-chunks-{chunk_tokens}", config).root


def engrain_serving(ws: Path, dtype: str, clients: int, seconds: float, other_top_k: int | None = None,
                    chunk_tokens: int | None = None) -> dict:
    default_top_k = RagConfig().top_k
    configure(ws, dtype, default_top_k)
    command = serve_command(ws)
    rows = serve_load(command, [f"{ws.name}:base", f"{ws.name}:rag"], clients, seconds, f"engrain-{dtype}")
    out = {"base": rows[f"{ws.name}:base"], "rag": rows[f"{ws.name}:rag"],
           "chunk_tokens": load_config(ws / "engrain.yaml").ingest.chunk_tokens}
    if dtype != "float32":  # the opt-in approximate path: chunks' KV reused wherever they come back
        reused = serve_load(command + ["--reuse-chunks"], [f"{ws.name}:rag"], clients, seconds, "engrain-chunks")
        out["rag_reuse_chunks"] = reused[f"{ws.name}:rag"]
    if dtype != "float32" and other_top_k:
        configure(ws, dtype, other_top_k)
        try:
            rows = serve_load(command, [f"{ws.name}:rag"], clients, seconds, f"engrain-top-{other_top_k}")
        finally:
            configure(ws, dtype, default_top_k)  # the next run starts from the defaults again
        out["rag_other_top_k"] = {**rows[f"{ws.name}:rag"], "top_k": other_top_k}
    if dtype != "float32" and chunk_tokens:
        chunked = chunked_workspace(chunk_tokens)
        configure(chunked, dtype, default_top_k)
        name = f"engrain-chunks-{chunk_tokens}"
        rows = serve_load(serve_command(chunked), [f"{chunked.name}:rag"], clients, seconds, name)
        out["rag_other_chunks"] = {**rows[f"{chunked.name}:rag"], "chunk_tokens": chunk_tokens}
    return out


# llama.cpp's extra buffer types repack weights for the CPU's special units (AMX among them). On an Intel Xeon with
# AMX a native build segfaulted on any prompt longer than one token with them on and ran with them off, so they are
# off unless --llama-extra-bufts. The same source patches this process and the server's.
NO_EXTRA_BUFTS = """
import llama_cpp.llama_cpp as lc
_default = lc.llama_model_default_params
def _params():
    params = _default()
    params.use_extra_bufts = False
    return params
lc.llama_model_default_params = _params
"""


def llama_cpp(max_new_tokens: int, clients: int, seconds: float, extra_bufts: bool,
              bandwidth: float) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    patch = "" if extra_bufts else NO_EXTRA_BUFTS
    exec(patch, {})
    gguf = engrain_home() / "downloads" / EMBEDDED_GGUF_NAME
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    tok = load_model(None, device="cpu", dtype="float32").tokenizer  # the same chat template and prompts
    prompts = [chat_prompt(tok, chat_messages(q)) for q in QUESTIONS]

    def complete(prompt: str, n: int) -> int:
        llm.reset()  # no KV reused from the previous prompt: each prompt is read in full, as engrain reads it
        out = llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1)
        return out["usage"]["completion_tokens"]

    complete(prompts[0], 4)
    t0 = time.perf_counter()
    tokens = sum(complete(p, max_new_tokens) for p in prompts)
    rate = tokens / (time.perf_counter() - t0)
    prompt = long_prompt(tok)
    first = first_token_s(lambda: complete(prompt, 1))
    llm.close()  # its memory back before the server loads its own copy
    server = patch + "import runpy, sys; sys.argv[0] = 'llama_cpp.server'; runpy.run_module('llama_cpp.server', " \
        "run_name='__main__')"
    command = [sys.executable, "-c", server, "--model", str(gguf), "--n_threads", str(os.cpu_count()),
               "--n_ctx", "2048", "--api_key", KEY, "--model_alias", "smollm2"]
    served = serve_load(command, ["smollm2"], clients, seconds, "llama-cpp")["smollm2"]
    gguf_mb = gguf.stat().st_size / 1e6  # every token reads the whole file's weights once
    return {"decode_base": rate, "first_token_s": first, "base": served, "extra_buffer_types": extra_bufts,
            "version": version("llama-cpp-python"), "weights_mb": gguf_mb, "limit": bandwidth / (gguf_mb * 1e6)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--llama-extra-bufts", action="store_true", help="keep llama.cpp's weight repacking on")
    ap.add_argument("--rag-top-k", type=int, default=None,
                    help="also load-test rag with this many chunks per prompt, beside the default rag.top_k")
    ap.add_argument("--rag-chunk-tokens", type=int, default=None,
                    help="also load-test rag from the documents chunked in this many tokens, beside the default")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    bandwidth = read_bandwidth()
    ws = build_workspace(OUT / "serve-ws" / "acme")
    runs = {}
    for dtype in ("float32", "auto"):
        runs[dtype] = in_process(dtype, args.max_new_tokens, bandwidth)
        runs[dtype]["serve"] = engrain_serving(ws, dtype, args.clients, args.seconds, args.rag_top_k,
                                             args.rag_chunk_tokens)
        print(f"{dtype}: {json.dumps(runs[dtype], default=str)[:300]}", flush=True)
    ref, fast = runs["float32"], runs["auto"]
    llama = None if args.skip_llama else llama_cpp(args.max_new_tokens, args.clients, args.seconds,
                                                      args.llama_extra_bufts, bandwidth)
    cpu = cpu_model()
    packing = prefill_dtype_for("cpu")
    # Ratios compare within one host: bf16 kernels differ between CPUs.
    print(f"CPU: {cpu}; the bf16 path prefills in {packing} (model.prefill_dtype auto)")
    print_table(ref, fast, llama, bandwidth, args.clients)
    (OUT / "answer_speed.json").write_text(json.dumps({"fp32": ref, "engrain": fast, "llama_cpp": llama,
                                                       "read_gb_s": bandwidth / 1e9, "cores": os.cpu_count(),
                                                       "cpu": cpu, "prefill_dtype": packing,
                                                       "torch": torch.__version__,
                                                       "args": vars(args)}, indent=1))
    print(f"wrote {OUT / 'answer_speed.json'}")


def print_table(ref: dict, fast: dict, llama: dict | None, bandwidth: float, clients: int) -> None:
    na = "not installed" if llama is None else "-"  # llama.cpp is timed on the base model only
    lines = [f"{os.cpu_count()} cores, read bandwidth {bandwidth / 1e9:.1f} GB/s; engrain answers in {fast['dtype']} "
             f"({fast['weights_mb']:.0f} MB of weights), the reference in {ref['dtype']} ({ref['weights_mb']:.0f} MB)",
             "", "| measure | fp32 | engrain | engrain / fp32 | llama.cpp (Q4_1 GGUF) | engrain / llama.cpp |",
             "| --- | --- | --- | --- | --- | --- |"]

    def row(name: str, a: float, b: float, c: float | None, fmt: str, higher_better: bool = True) -> None:
        ratio = (b / a) if higher_better else (a / b)
        vs = "-" if c is None else f"{(b / c) if higher_better else (c / b):.2f}x"
        third = na if c is None else format(c, fmt)
        lines.append(f"| {name} | {a:{fmt}} | {b:{fmt}} | {ratio:.2f}x | {third} | {vs} |")

    row("batch-1 decode, base (tokens/s)", ref["decode_base"], fast["decode_base"],
        llama and llama["decode_base"], ".1f")
    llama_share = "" if llama is None else f"{llama['decode_base'] / llama['limit']:.0%} of {llama['limit']:.0f}"
    lines.append(f"| share of the weights-bandwidth limit | {ref['decode_base'] / ref['limit']:.0%} of "
                 f"{ref['limit']:.0f} | {fast['decode_base'] / fast['limit']:.0%} of {fast['limit']:.0f} | | "
                 f"{llama_share} | |")
    row("batch-1 decode, LoRA merged (tokens/s)", ref["decode_lora"], fast["decode_lora"], None, ".1f")
    lines.append(f"| LoRA / base decode | {ref['decode_lora'] / ref['decode_base']:.2f} | "
                 f"{fast['decode_lora'] / fast['decode_base']:.2f} | | | |")
    row(f"first token, {fast['prompt_tokens']}-token prompt (s)", ref["first_token_s"], fast["first_token_s"],
        llama and llama["first_token_s"], ".3f", higher_better=False)
    # the same time per prompt token, to set beside the server's prefill per token under load (the worker rows)
    lines.append(f"| first token, ms per prompt token | {1000 * ref['first_token_s'] / ref['prompt_tokens']:.2f} | "
                 f"{1000 * fast['first_token_s'] / fast['prompt_tokens']:.2f} | | | |")
    for model in ("base", "rag"):
        row(f"{clients} clients, 24-token answers, {model} (requests/s)", ref["serve"][model]["rps"],
            fast["serve"][model]["rps"], llama and llama["base"]["rps"] if model == "base" else None, ".2f")
        row(f"{clients} clients, {model}, p50 latency (s)", ref["serve"][model]["p50_ms"] / 1000,
            fast["serve"][model]["p50_ms"] / 1000, llama and llama["base"]["p50_ms"] / 1000 if model == "base"
            else None, ".2f", higher_better=False)
    if "rag_reuse_chunks" in fast["serve"]:
        reused = fast["serve"]["rag_reuse_chunks"]
        lines.append(f"| {clients} clients, rag, chunks' KV reused (--reuse-chunks; requests/s, p50 s) | | "
                     f"{reused['rps']:.2f}, {reused['p50_ms'] / 1000:.2f} | "
                     f"{reused['rps'] / ref['serve']['rag']['rps']:.2f}x | - | - |")
    if "rag_other_top_k" in fast["serve"]:
        other, default = fast["serve"]["rag_other_top_k"], fast["serve"]["rag"]
        lines.append(f"| {clients} clients, rag with {other['top_k']} chunks instead of {RagConfig().top_k} "
                     f"(requests/s, p50 s) | | {other['rps']:.2f}, {other['p50_ms'] / 1000:.2f} | default / this: "
                     f"{default['rps'] / other['rps']:.2f}x | - | - |")
    if "rag_other_chunks" in fast["serve"]:
        other, default = fast["serve"]["rag_other_chunks"], fast["serve"]["rag"]
        lines.append(f"| {clients} clients, rag from chunks of {other['chunk_tokens']} tokens instead of "
                     f"{fast['serve']['chunk_tokens']} (requests/s, p50 s) | | {other['rps']:.2f}, "
                     f"{other['p50_ms'] / 1000:.2f} | this / default: {other['rps'] / default['rps']:.2f}x | - | - |")
    for model in ("base", "rag"):
        lines.append(f"| {clients} clients, {model}: the server worker's time | {worker_shares(ref['serve'][model])} | "
                     f"{worker_shares(fast['serve'][model])} | | - | - |")
    for load_name in ("rag_reuse_chunks", "rag_other_top_k", "rag_other_chunks"):
        if load_name in fast["serve"]:
            lines.append(f"| {clients} clients, {load_name}: the server worker's time | | "
                         f"{worker_shares(fast['serve'][load_name])} | | - | - |")
    lines.append(f"| decode weights read per token (MB) | {ref['step_mb']:.0f} ({ref['decode_weights']}) | "
                 f"{fast['step_mb']:.0f} ({fast['decode_weights']}) | | | |")
    if fast["decode_base_own_weights"]:
        lines.append(f"\n{fast['dtype']} decoding with its own weights instead of {fast['decode_weights']}: "
                     f"{fast['decode_base_own_weights']:.1f} tokens/s at batch 1")
    for run in (ref, fast):
        f = run["linears"]
        steps = ", ".join(f"{n}: {r['own_ms']:.1f} / {r['quant_ms']:.1f}" for n, r in f["rows"].items())
        kinds = "+".join(f["kinds"])
        lines.append(f"\n{run['dtype']}: the linear layers alone take {f['ms']:.1f} ms per token at batch 1 "
                     f"({f['gb_s']:.0f} GB/s of weights read), {f['quant_ms']:.1f} ms as {f['mode']} ({kinds}, "
                     f"{f['quant_gb_s']:.0f} GB/s); a whole decode step takes {1000 / run['decode_base']:.1f} ms. "
                     f"ms per step at N rows, own weights / {f['mode']}: {steps}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

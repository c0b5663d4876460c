"""The decode loop's quantized step compiled (``model.compile_decode``, ``src/engrain/models/compiled_decode.py``:
inductor's C++ kernels) against the eager step, alternately in one process on the same prompt:

    python bench/bench_compiled_decode.py      # prints a table, writes bench/out/compiled_decode.json

Question it answers: how much of a batch-1 decode step is Python and dispatch overhead that compiling the step's
small ops (norms, rotary, cache writes, attention of one query) would remove, and what the compile costs. Greedy
tokens of both are compared (bf16 kernels fused differently round differently). Best of ``--repeats`` per form.
Then what a server start pays before it listens (``fastgen.warm_up`` in a new process, twice, on this run's
inductor cache): dynamo traces the step again in every process, and the batch of two rows is a second graph.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A fresh inductor cache, so the first compiled call shows what compiling costs, not a cache an earlier run left.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="engrain-inductor-")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from engrain.models import compiled_decode, fastgen, load_model

OUT = ROOT / "bench" / "out"
PROMPT = "Tell me about the history of the Roman empire."
WEIGHTS = "int4"  # the default's quantized copy on a CPU with native bf16 (models/load.py's pick_decode_weights)


def decode(model, prompt: list[int], tokens: int) -> tuple[list[int], float]:
    """Greedy tokens (no stop: every run decodes ``tokens``) and the seconds they took, prefill included."""
    t0 = time.perf_counter()
    out = fastgen.generate_many(model, [prompt], batch_size=1, max_new_tokens=tokens, stop_ids=[-1], pad_id=0)
    return out[0], time.perf_counter() - t0


def server_start_seconds(prompt: list[int]) -> float:
    """Seconds of ``fastgen.warm_up`` in a new process (model loading not counted)."""
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT / 'src')!r})\n"
            "from engrain.models import fastgen, load_model\n"
            f"lm = load_model('embedded', dtype='auto', decode_weights={WEIGHTS!r}, compile_decode=True)\n"
            f"t0 = time.perf_counter(); fastgen.warm_up(lm.model, {prompt!r}, 0)\n"
            "print(time.perf_counter() - t0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lm = load_model("embedded", dtype="auto", decode_weights=WEIGHTS)
    text = lm.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                            tokenize=False)
    prompt = lm.tokenizer.encode(text, add_special_tokens=False)

    def decode_with(compiled: bool) -> tuple[list[int], float]:
        setattr(lm.model, compiled_decode.ATTRIBUTE, compiled)  # what model.compile_decode sets at load
        return decode(lm.model, prompt, args.tokens)

    ref, _ = decode_with(False)  # warm-up of the eager path
    # The eager step alone too, before anything is compiled: compiling may change the process's state (threads,
    # kernels chosen), so the alternating rows below are held to it.
    before = [decode_with(False)[1] for _ in range(args.repeats)]
    t0 = time.perf_counter()
    got, _ = decode_with(True)
    compile_s = time.perf_counter() - t0
    if fastgen._forward in compiled_decode._failed:
        sys.exit("compiling the decode step failed (see the note above): nothing to compare")
    times = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        for form in ("eager", "compiled"):
            times[form].append(decode_with(form == "compiled")[1])
    times["eager before compiling"] = before
    best = {form: min(t) for form, t in times.items()}
    same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), len(ref))
    rate = {form: args.tokens / s for form, s in best.items()}
    print(f"{lm.model.dtype}, {WEIGHTS} decode weights, {torch.get_num_threads()} threads, {args.tokens} tokens")
    print("| step | tokens/s | x eager |")
    print("| --- | --- | --- |")
    for form in ("eager before compiling", "eager", "compiled"):
        print(f"| {form} | {rate[form]:.1f} | {rate[form] / rate['eager']:.2f} |")
    print(f"first compiled call (compile included): {compile_s:.1f} s; greedy tokens equal up to token {same}")
    starts = [server_start_seconds(prompt) for _ in range(2)]
    print(f"a server's start (warm_up in a new process, this run's cache): {starts[0]:.1f} s, then {starts[1]:.1f} s")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "compiled_decode.json").write_text(json.dumps(
        {"tokens_per_s": rate, "seconds": times, "first_compiled_call_s": compile_s, "same_tokens_up_to": same,
         "server_start_s": starts,
         "tokens": args.tokens, "repeats": args.repeats, "dtype": str(lm.model.dtype), "decode_weights": WEIGHTS,
         "threads": torch.get_num_threads(), "cores": os.cpu_count(),
         "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}, indent=2))
    print(f"wrote {OUT / 'compiled_decode.json'}")


if __name__ == "__main__":
    main()

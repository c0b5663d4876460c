"""How much do rag's greedy answers depend on which prompts share a batch? The same 149 acme rag prompts are answered
by the decode loop ``engrain compare`` uses (``fastgen.generate_many``, 16 rows) and by the server's continuous
batching (``stream.Stream``, up to 8 rows, new rows joining as others finish), in fp32 and in the default bf16 path.

    python experiments/answering/batch_rounding.py   # writes experiments/answering/results/batch-rounding/results.json

In fp32 the two are held equal by tests; in bf16 a matmul's rounding depends on the shapes it runs in, and a 135M
model's greedy continuation can follow a different token from the first rounding difference on. This measures how
often that happens and whether it moves accuracy. The workspace is reuse_chunks.py's (acme, default chunking).
"""

from __future__ import annotations

import json
import platform
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import EXAMPLE, OUT  # noqa: E402
from reuse_chunks import workspace  # noqa: E402

from engrain.atomic import write_text  # noqa: E402
from engrain.evaluate import metrics  # noqa: E402
from engrain.evaluate.bench import read_questions  # noqa: E402
from engrain.memory.rag import RagMemory  # noqa: E402
from engrain.models import fastgen, load_model, stop_token_ids  # noqa: E402
from engrain.models.prompt_cache import PromptCache  # noqa: E402
from engrain.models.stream import Stream  # noqa: E402
from engrain.workspace import Workspace  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "batch-rounding" / "results.json"
MAX_NEW = 48


def streamed(model, prompts: list[list[int]], pad_id: int, stops: list[int], rows: int = 8) -> list[list[int]]:
    """Every prompt answered through the server's loop: up to ``rows`` at once, new ones joining as others end."""
    stream = Stream(model, pad_id=pad_id, prompt_cache=PromptCache())
    got: dict[int, list[int]] = {}
    order: dict[int, int] = {}
    waiting = list(range(len(prompts)))
    while waiting or len(stream):
        if waiting and len(stream) * 4 <= rows * 3:  # as the scheduler admits: once a quarter of the rows are free
            take, waiting = waiting[:rows - len(stream)], waiting[rows - len(stream):]
            order.update(zip(stream.admit([prompts[i] for i in take], [MAX_NEW] * len(take)), take))
        done = set()
        for handle, token in stream.step():
            got.setdefault(order[handle], []).append(token)
            if token in stops:
                done.add(handle)
        stream.advance(done)
    return [got[i] for i in range(len(prompts))]


def one_dtype(dtype: str, questions) -> dict:
    lm = load_model(None, dtype=dtype, decode_weights="model" if dtype == "float32" else "auto")
    ws = Workspace.at(workspace(OUT / "reuse-chunks-ws" / "acme"))
    rag = RagMemory(ws, lm)
    tok = lm.tokenizer
    hits = rag.retriever.retrieve([q.question for q in questions], rag.config.top_k)
    prompts = [tok(rag.fit_prompt(q.question, h, MAX_NEW)[0], add_special_tokens=False)["input_ids"]
               for q, h in zip(questions, hits)]
    stops = stop_token_ids(tok)
    batched = fastgen.generate_many(lm.model, prompts, batch_size=16, max_new_tokens=MAX_NEW, stop_ids=stops,
                                    pad_id=tok.pad_token_id)
    served = streamed(lm.model, prompts, tok.pad_token_id, stops)
    text = lambda ids: tok.decode([t for t in ids if t not in stops], skip_special_tokens=True)  # noqa: E731
    a = [metrics.contains(text(x), q.answers) for x, q in zip(batched, questions)]
    b = [metrics.contains(text(y), q.answers) for y, q in zip(served, questions)]
    same = sum(text(x) == text(y) for x, y in zip(batched, served))
    print(f"{dtype}: {same}/{len(questions)} answers identical; contains {sum(a) / len(a):.3f} (16-row batches) "
          f"against {sum(b) / len(b):.3f} (server's stream)", flush=True)
    return {"dtype": str(lm.model.dtype), "identical_answers": same, "contains_batched": sum(a) / len(a),
            "contains_streamed": sum(b) / len(b), "streamed_vs_batched": metrics.paired_difference(b, a),
            "answers": {"batched": [text(x) for x in batched], "streamed": [text(y) for y in served]}}


def main() -> None:
    questions = read_questions(EXAMPLE / "questions.jsonl")
    result = {"question": "rag's greedy answers under two batchings of the same prompts (acme, 149 questions)",
              "n_questions": len(questions), "max_new_tokens": MAX_NEW, "ids": [q.id for q in questions],
              "runs": {dtype: one_dtype(dtype, questions) for dtype in ("float32", "auto")},
              "environment": {"python": platform.python_version(), "torch": version("torch"),
                              "transformers": version("transformers"), "engrain": version("engrain"),
                              "machine": platform.machine()}, "seed": 0}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_text(RESULTS, json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

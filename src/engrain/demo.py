"""`engrain demo`'s settings: its methods, its budgets (the workspace config it writes) and where the example
corpus lies."""

from __future__ import annotations

from pathlib import Path

from .errors import EngrainError

DEMO_METHODS = "base,context,rag,lora"  # lora+rag with --methods; write_demo_config says what it answers here
DEMO_LATENCY_SAMPLE = 4  # questions timed one at a time per method (p50/p95); `engrain compare` times 10
# Training's share of the demo's 20 minutes (train.max_minutes): on the slowest host measured, answering four methods
# and measuring forgetting fit in the rest (experiments/knowledge's acme-demo-2026-12-07-train-11-minutes row).
DEMO_TRAIN_MINUTES = 11.0


def write_demo_config(path: Path) -> None:
    """The demo's budgets: sized so the whole pipeline fits the demo's time on 2 CPU cores with the embedded model
    (experiments/knowledge's acme-demo rows time it), where training runs near the machine's matmul limit
    (``bench/bench_train.py`` measures it).
    Synthesis by the model-free ``facts`` strategy (every sentence stated in full, the passage once more in one
    shuffled order, at most 12 questions per chunk, two passes over them); chunks of 128 tokens, ``rag.top_k`` per
    RAG prompt (experiments/retrieval's acme-demo-chunks rows measure it at these chunks).
    The loss on fact tokens is weighted three times (``train.fact_weight``): at these budgets it answered more on
    three seeds of acme and on fictional-dev, at the full defaults it did not (experiments/knowledge's fact-weight
    rows), so only the demo sets it. Its steps take rows of 512 tokens (``train.pack_tokens``, LoRA's default too),
    twice the updates for the same tokens, which answered more on three seeds of acme (experiments/knowledge's
    seq-512 rows), and B at four times A's rate (LoRA+, LoRA's default: it answered more on three seeds of acme
    here, experiments/knowledge's acme-demo-lora-plus rows). The replay stays the base model's chat answers alone
    (``train.replay_sources``): LoRA's default, half of it as the model's own prose, answered less of acme at
    these budgets on both seeds measured (experiments/knowledge's acme-demo-self-prose rows).
    Training stops within ``DEMO_TRAIN_MINUTES`` (``train.max_minutes``): a host too slow for every planned step
    trains fewer, its learning-rate decay ending with them, so the demo keeps its time on slower hosts than the one
    it was sized on and says in results.json's train summary (``cut_by_max_minutes``) that it cut.
    Its items are closed-book only (``synth.facts_reading`` 0): open-book items did not answer more closed-book here
    and cost more training time than the demo holds (experiments/knowledge's acme-demo-open-book rows). A memory
    never trained with chunks in view reads rag's chunks badly, so the demo's hybrid (lora+rag, which `engrain
    serve` offers) answers level with retrieval or below it; open-book items take that collapse away
    (experiments/knowledge's acme-demo-today hybrid and reading rows).
    Edit WS/engrain.yaml and rerun to trade time for quality (more orders, questions per chunk, epochs, open-book
    items)."""
    from .config import EngrainConfig, save_config

    config = EngrainConfig()
    config.ingest.chunk_tokens = 128
    config.ingest.chunk_overlap = 16
    config.synth.facts_per_chunk = 12
    config.synth.facts_orders = 1
    config.synth.facts_reading = 0
    config.train.epochs = 2.0
    config.train.fact_weight = 3.0
    config.train.pack_tokens = 512
    config.train.replay_sources = ["self_distill"]
    config.train.max_minutes = DEMO_TRAIN_MINUTES
    save_config(config, path)


def example_bench() -> Path:
    """The example corpus: examples/acme in a source checkout."""
    here = Path(__file__).resolve()
    for root in (here.parents[2], Path.cwd()):
        candidate = root / "examples" / "acme"
        if (candidate / "questions.jsonl").is_file():
            return candidate
    raise EngrainError("The example corpus (examples/acme) was not found.",
                       hint="Run `engrain demo` from an engrain source checkout, or use `engrain compare BENCH`.")

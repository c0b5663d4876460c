"""Does a trained memory know the documents? Closed-book cloze accuracy before and after training.

    python bench/exp_train_fictional.py [--docs 10] [--memory lora] [--epochs 4] [--bench PATH]

Takes the first N documents of a benchmark folder (default ../shared/data/fictional-dev, BENCHMARKS.md layout),
makes training items from the documents' own sentences (below; only when the workspace has no synthetic data of its
own, e.g. from `engrain synth --strategies facts`), trains the memory with `engrain.train.train`, and scores the
base model and the memory on that subset's cloze questions put as "Complete the sentence: ...", with the normalized
"contains" metric (any gold answer inside the normalized output). Writes bench/out/exp_train_fictional.json.

The sentence items use the documents alone (never the questions): every sentence as text, and "Complete the
sentence" chat items split at a third, a half and two thirds of its words.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from engrain.config import TrainConfig  # noqa: E402
from engrain.workspace import Workspace  # noqa: E402


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(" " if c in string.punctuation or c in "–—‘’“”" else c for c in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def contains(output: str, golds: list[str]) -> bool:
    out = normalize(output)
    return any(normalize(g) and normalize(g) in out for g in golds)


def sentence_items(doc_id: str, text: str, splits=(1 / 3, 1 / 2, 2 / 3), with_text: bool = True) -> list[dict]:
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.replace("\n", " ")) if len(s.split()) >= 6]
    items = []
    for i, s in enumerate(sentences):
        base = {"doc_ids": [doc_id], "chunk_ids": [f"{doc_id}#s{i}"], "generator": "sentences", "seed": 0}
        if with_text:
            items.append({**base, "id": f"{doc_id}-s{i}-text", "strategy": "sentences", "text": s})
        words = s.split()
        for frac in splits:
            k = max(2, round(len(words) * frac))
            items.append({**base, "id": f"{doc_id}-s{i}-c{k}", "strategy": "sentences", "messages": [
                {"role": "user", "content": "Complete the sentence: " + " ".join(words[:k])},
                {"role": "assistant", "content": " ".join(words[k:])}]})
    return items


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", default=str(ROOT.parent / "shared" / "data" / "fictional-dev"))
    ap.add_argument("--docs", type=int, default=10)
    ap.add_argument("--memory", default="lora")
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--replay-share", type=float, default=0.1)
    ap.add_argument("--workspace", default=str(ROOT / "bench" / "out" / "exp-fictional-ws"))
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--small", action="store_true",
                    help="fewer items (one split at 2/3 of each sentence, no text items): for a loaded machine")
    args = ap.parse_args()

    from engrain.memory.registry import open_memory
    from engrain.models import load_model
    from engrain.train import train

    bench = Path(args.bench)
    docs = sorted((bench / "docs").iterdir())[:args.docs]
    doc_ids = {p.stem for p in docs}
    questions = [q for q in map(json.loads, (bench / "questions.jsonl").read_text().splitlines())
                 if set(q["docs"]) <= doc_ids]
    ws = Workspace.at(args.workspace)
    if not ws.synth_dir.is_dir() or not any(ws.synth_dir.glob("*.jsonl")):
        kw = dict(splits=(2 / 3,), with_text=False) if args.small else {}
        items = [it for p in docs for it in sentence_items(p.stem, p.read_text(encoding="utf-8"), **kw)]
        ws.synth_dir.mkdir(parents=True, exist_ok=True)
        (ws.synth_dir / "sentences.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    n_items = sum(1 for f in ws.synth_dir.glob("*.jsonl") for line in f.read_text().splitlines() if line.strip())
    print(f"{len(docs)} documents, {len(questions)} cloze questions, {n_items} training items", flush=True)

    prompts = [f"Complete the sentence: {q['question']}" for q in questions]
    lm = load_model(None, device="cpu")
    t0 = time.time()
    base_out = open_memory("base", ws, lm).answer(prompts, max_new_tokens=args.max_new_tokens)
    base_acc = sum(contains(a.text, q["answers"]) for a, q in zip(base_out, questions)) / len(questions)
    print(f"base: contains {base_acc:.3f} ({time.time() - t0:.0f} s)", flush=True)

    cfg = TrainConfig(memory=args.memory, epochs=args.epochs, lr=args.lr, seq_len=512, micro_batch=4,
                      replay_share=args.replay_share, val_fraction=0.0, save_every=25, eval_every=0)
    summary = train(ws, cfg, None, force=True)
    mem = open_memory(args.memory, ws, load_model(None, device="cpu"))
    t0 = time.time()
    mem_out = mem.answer(prompts, max_new_tokens=args.max_new_tokens)
    mem_acc = sum(contains(a.text, q["answers"]) for a, q in zip(mem_out, questions)) / len(questions)
    print(f"{args.memory}: contains {mem_acc:.3f} ({time.time() - t0:.0f} s)", flush=True)

    result = {"bench": bench.name, "docs": len(docs), "questions": len(questions), "training_items": n_items,
              "base_contains": base_acc, f"{args.memory}_contains": mem_acc,
              "train": {k: summary.get(k) for k in ("steps", "train_seconds", "tokens_per_s", "final_train_loss",
                                                    "learning_rate", "trainable_params")},
              "config": cfg.model_dump(),
              "examples": [{"q": q["question"], "gold": q["answers"], "base": b.text, args.memory: m.text}
                           for q, b, m in list(zip(questions, base_out, mem_out))[:10]]}
    out = ROOT / "bench" / "out" / f"exp_train_fictional_{args.memory}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(f"| memory | contains |\n|---|---|\n| base | {base_acc:.3f} |\n| {args.memory} | {mem_acc:.3f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""How fast does each trainable memory take in facts? A small memorisation probe, minutes on a CPU.

    python bench/exp_memorise.py --memory memory_layer|lora [--lr 1e-2] [--epochs 10] [--items 64]
                                 [--options '{"layers": "spread"}'] [--workspace bench/out/fictional-ws]
                                 [--wordings N]

Takes the first N question/answer items of a workspace's synthetic data (WS/synth/*.jsonl, e.g. the cloze items
`exp_fictional.py` writes), trains the memory on them alone (loss on the answers, batches of 8, AdamW or the
memory layer's own row-sparse optimizer and TF-IDF hook, no replay, no schedule) and reports the training loss per
epoch and how many of the N answers greedy decoding then reproduces. It measures capacity and learning speed on the
training items themselves, not knowledge of the documents (that is `exp_fictional.py`'s job): a memory that cannot
reproduce what it was trained on will not answer paraphrases of it.

With --wordings N it takes the first --items sentence-completion items ("Complete the sentence about <subject>:
<start>") instead, trains each in N instruction wordings (its own, then the `facts` strategy's further ones, as
`synth.facts_wordings: N` writes them; none is the benchmark's), and also asks each as `engrain compare` asks a
cloze probe ("Complete the sentence with the missing words: ..."), words it never saw: does the memory reach a fact
only through the words it was trained in?
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory", choices=["memory_layer", "lora"], default="memory_layer")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--options", default="{}", help="memory layer options as JSON (train.options.memory_layer)")
    ap.add_argument("--workspace", default=str(ROOT / "bench" / "out" / "fictional-ws"))
    ap.add_argument("--wordings", type=int, default=0, help="train sentence completions in N instruction wordings "
                                                            "(1-5, as synth.facts_wordings) and ask them in the "
                                                            "benchmark's")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from engrain import models
    from engrain.memory.memory_layer import MemoryLayerKind
    from engrain.synth.facts import COMPLETE, WORDINGS, completion_parts

    torch.manual_seed(0)
    rng = random.Random(0)
    lm = models.load_model(None, device="cpu", dtype="float32")
    tok, model = lm.tokenizer, lm.model
    qa = []
    for path in sorted((Path(args.workspace) / "synth").glob("*.jsonl")):
        items = [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]
        qa += [item["messages"] for item in items if "messages" in item]
    if not 0 <= args.wordings <= 1 + len(WORDINGS):
        sys.exit(f"--wordings takes 1 to {1 + len(WORDINGS)} (0: plain memorisation).")
    if args.wordings:
        qa = [m for m in qa if completion_parts(m[0]["content"])]
    if len(qa) < args.items:
        kind = "sentence-completion" if args.wordings else "question/answer"
        sys.exit(f"{args.workspace}/synth holds {len(qa)} {kind} items, fewer than --items {args.items}; "
                 "run bench/exp_fictional.py (or engrain synth) first.")
    qa = qa[:args.items]
    if args.wordings:
        completions = [(completion_parts(m[0]["content"]), m[1]["content"]) for m in qa]  # ((subject, start), answer)
        qa = [[{"role": "user", "content": w.format(subject=subject, start=start)}, {"role": "assistant", "content": a}]
              for (subject, start), a in completions for w in [COMPLETE] + WORDINGS[:args.wordings - 1]]
    end = models.end_of_turn(tok)
    rows = [(tok(models.chat_prompt(tok, models.chat_messages(m[0]["content"])), add_special_tokens=False)["input_ids"],
             tok(m[1]["content"] + end, add_special_tokens=False)["input_ids"]) for m in qa]

    kind = MemoryLayerKind() if args.memory == "memory_layer" else None
    if kind:
        model = kind.attach(model, tok, {"options": {"memory_layer": json.loads(args.options)}}, None)
        opt = kind.make_optimizer(model, args.lr, 0.0)
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_of(batch) -> torch.Tensor:
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, a) in enumerate(batch):
            ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            mask[i, :len(p) + len(a)] = 1
            labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)

    model.train()
    t0 = time.time()
    for epoch in range(args.epochs):
        order = list(range(len(rows)))
        rng.shuffle(order)
        losses = []
        for start in range(0, len(order), 8):
            loss = loss_of([rows[i] for i in order[start:start + 8]])
            loss.backward()
            if kind:
                kind.sparse_grad_hook(model)  # only the TF-IDF top rows of the slots read move
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        print(f"epoch {epoch + 1}: train loss {sum(losses) / len(losses):.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    asked = rows[::max(1, args.wordings)]  # with wordings, each fact in its own (first) wording only
    gens = models.generate(dataclasses.replace(lm, model=model), [tok.decode(p) for p, _ in asked], max_new_tokens=16,
                           batch_size=32)
    if args.wordings:
        from engrain.evaluate.compare import cloze_text

        # Counted by the answer's first three words: a cloze probe asks for the missing words, not the whole rest of
        # the sentence, and 16 new tokens do not always reach a long answer's end.
        first = [" ".join(a.split()[:3]).lower() for _, a in completions]
        own = sum(f in g.text.lower() for f, g in zip(first, gens))
        cloze = [models.chat_prompt(tok, models.chat_messages(cloze_text(start))) for (_, start), _ in completions]
        gens = models.generate(dataclasses.replace(lm, model=model), cloze, max_new_tokens=24, batch_size=32)
        other = sum(f in g.text.lower() for f, g in zip(first, gens))
        print(f"{args.memory} lr {args.lr} options {args.options}, {args.wordings} wordings: {args.epochs} epochs, "
              f"final train loss {sum(losses) / len(losses):.3f}; of {len(completions)} facts, answered in the item's "
              f"own wording {own}, in the benchmark's {other}")
        return
    hits = sum(m[1]["content"].lower() in g.text.lower() for m, g in zip(qa, gens))
    print(f"{args.memory} lr {args.lr} options {args.options}: {args.epochs} epochs, final train loss "
          f"{sum(losses) / len(losses):.3f}, reproduces {hits}/{len(qa)} trained answers")


if __name__ == "__main__":
    main()

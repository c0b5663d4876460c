"""Teacher targets for the distillation loss (``train.distill`` > 0).

The teacher is the base model reading the item's source chunks in its prompt, exactly as `rag` would show them;
the student is the model being trained, which sees the item alone. Matching the teacher's whole token distribution
on the answer carries more than the one correct token (Knowledge Modules, 2025: distilled LoRA 37.2 against 26.1
for next-token training on QuALITY; Cartridges trains its KV cache the same way).

For every training example the teacher's top-k log-probabilities are kept at each loss position, in the order of
the example's labels, so the trainer can line them up with its own logits after packing. They are computed once,
before the memory is attached (the teacher is the unchanged base model), and cached in
``WS/train/distill/<model>-k<K>.jsonl``, appended group by group, so an interrupted run resumes where it stopped.
An item without ``chunk_ids``, or whose chunks are no longer in the corpus, keeps the plain next-token loss.

Items of one chunk share the start of their teacher prompts (system message and the chunk itself): that start runs
once and its KV cache is reused for the items' own tokens.

With ``train.distill_hidden`` > 0 the teacher's hidden states are kept too, at the outputs of a few blocks
(``hidden_blocks``) on the same positions, for the trainer to match the student's against (Knowledge Modules' deep
context distillation matches hidden states as well as logits). They are stored one file per example under
``WS/train/distill/<model>-hidden/``, named by what the teacher saw, each written atomically.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_bytes
from ..jsonl import read_jsonl
from ..models import LM, context_question, render_chunks
from ..models.fastgen import common_start
from ..progress import Progress, note
from ..workspace import Workspace
from .data import file_safe, render_messages

BATCH = 16  # items per teacher forward
HIDDEN_EVERY = 5  # hidden states matched at every fifth block's output and the last block's


@dataclass
class Teacher:
    """The teacher's top-k token ids and log-probabilities at each loss position of one example, and with
    ``train.distill_hidden`` its hidden states there: (positions, blocks, hidden size), bf16."""

    ids: list[list[int]]
    logprobs: list[list[float]]
    hidden: object | None = None


def hidden_blocks(n_blocks: int) -> list[int]:
    """The blocks whose outputs hidden-state distillation matches: every ``HIDDEN_EVERY``-th and the last."""
    return sorted({*range(HIDDEN_EVERY - 1, n_blocks, HIDDEN_EVERY), n_blocks - 1})


@contextlib.contextmanager
def block_outputs(model, on: bool = True):
    """Collects the outputs of the model's ``hidden_blocks`` during the forwards run inside (a list, in block
    order, filled by each forward); nothing is hooked when not ``on``. A distributed wrapper's model is looked into."""
    got: list = []
    if not on:
        yield got
        return
    from ..memory.memory_layer import decoder_layers

    layers = decoder_layers(getattr(model, "module", model))
    blocks = hidden_blocks(len(layers))

    def keep(_module, _args, output):
        got.append(output[0] if isinstance(output, tuple) else output)

    handles = [layers[i].register_forward_hook(keep) for i in blocks]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()



def first_loss_index(labels: list[int], ignore: int) -> int | None:
    """Where the loss starts; None when the labels are not one contiguous tail (then there is no teacher)."""
    j = next((i for i, x in enumerate(labels) if x != ignore), None)
    if j is None or j == 0 or any(x == ignore for x in labels[j:]):
        return None
    return j


def teacher_prefix(tokenizer, item: dict, ids: list[int], j: int, context: str) -> list[int]:
    """The teacher's tokens before the loss tail ``ids[j:]``: the item's own prompt with the context added.

    Chat items: the same messages with the last user message asked as `rag` asks it (the documents, then the
    question). Text items: the context, a blank line, then the tokens before the tail."""
    if "messages" in item:
        msgs = [dict(m) for m in item["messages"][:-1]]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        msgs[last]["content"] = context_question(msgs[last]["content"], context)
        prompt, _ = render_messages(tokenizer, msgs + [item["messages"][-1]])
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return tokenizer(context + "\n\n", add_special_tokens=False)["input_ids"] + ids[:j]


def cache_path(ws: Workspace, lm: LM, top_k: int) -> Path:
    return ws.root / "train" / "distill" / f"{file_safe(lm.name)}-k{top_k}.jsonl"


def hidden_dir(ws: Workspace, lm: LM) -> Path:
    return ws.root / "train" / "distill" / f"{file_safe(lm.name)}-hidden"


def _read_hidden(folder: Path, sig: str):
    """The teacher hidden states stored for signature ``sig``; None when missing or unreadable."""
    import torch

    path = folder / f"{sig}.pt"
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu")
    except Exception:  # a file from an older torch or damaged on disk: computed again
        return None


def _write_hidden(folder: Path, sig: str, hidden) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(hidden.clone(), buf)
    write_bytes(folder / f"{sig}.pt", buf.getvalue())


def _signature(prefix: list[int], tail: list[int]) -> str:
    """Identifies what the teacher saw: a changed item, chunk or template gives another signature."""
    return hashlib.sha1(json.dumps([prefix, tail]).encode()).hexdigest()[:20]


def _read_cache(path: Path) -> dict[str, dict]:
    """key -> record; a line torn by a crash (the last one) is skipped and recomputed."""
    done: dict[str, dict] = {}
    if path.is_file():
        for _, rec in read_jsonl(path, skip_bad=True):
            done[rec["key"]] = rec
    return done


def _run_group(model, jobs: list[tuple[str, list[int], list[int]]], top_k: int, pad_id: int,
               hidden: bool = False) -> list[Teacher]:
    """Teacher targets for items that share a prompt start: (key, prefix, tail) each; the logits needed start at
    the last prefix token, so the shared start ends before it (``common_start`` of the prefixes). With ``hidden``,
    the outputs of ``hidden_blocks`` at the same positions as well."""
    import torch

    seqs = [p + t for _, p, t in jobs]
    shared = common_start([p for _, p, _ in jobs])
    device = next(model.parameters()).device
    start_cache = None
    if shared:
        first = model(input_ids=torch.tensor([seqs[0][:shared]], device=device), use_cache=True)
        start_cache = first.cache if getattr(first, "cache", None) is not None else first.past_key_values
    out: list[Teacher] = []
    for b in range(0, len(jobs), BATCH):
        part = list(zip(jobs[b:b + BATCH], seqs[b:b + BATCH]))
        own = [s[shared:] for _, s in part]
        width = max(len(o) for o in own)
        ids = torch.full((len(own), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(own), shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for i, o in enumerate(own):
            ids[i, :len(o)] = torch.tensor(o)
            mask[i, shared:shared + len(o)] = 1
        kwargs = {}
        if start_cache is not None:
            cache = copy.deepcopy(start_cache)
            cache.batch_repeat_interleave(len(own))
            kwargs["cache"] = cache
        pos = torch.arange(shared, shared + width).expand(len(own), -1)
        with block_outputs(model, hidden) as states:
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                           use_cache=start_cache is not None, **kwargs).logits
        for i, ((_, prefix, tail), _) in enumerate(part):
            first = len(prefix) - 1 - shared  # the logit at the last prefix token predicts tail[0]
            lp = torch.log_softmax(logits[i, first:first + len(tail)].float(), dim=-1)
            top = lp.topk(top_k, dim=-1)
            kept = None
            if hidden:
                kept = torch.stack([h[i, first:first + len(tail)] for h in states], dim=1).to(torch.bfloat16).cpu()
            out.append(Teacher(top.indices.tolist(), [[round(v, 4) for v in row] for row in top.values.tolist()],
                               kept))
    return out


def teacher_targets(ws: Workspace, lm: LM, examples: list, items: dict[str, dict], top_k: int, ignore: int,
                    show: bool = True, hidden: bool = False) -> dict[str, Teacher]:
    """key -> Teacher for every example whose item names chunks still in the corpus (computed, or read from the
    cache). ``items`` maps an example's key to its synthetic item. ``hidden``: with the teacher's hidden states at
    ``hidden_blocks``."""
    import torch

    from ..corpus.schema import read_chunks

    chunks = {c.id: c for c in read_chunks(ws)} if ws.chunks_path.is_file() else {}
    path = cache_path(ws, lm, top_k)
    done = _read_cache(path)
    folder = hidden_dir(ws, lm)
    result: dict[str, Teacher] = {}
    groups: dict[tuple, list[tuple[str, list[int], list[int]]]] = {}
    sigs: dict[str, str] = {}
    skipped = 0
    for ex in examples:
        item = items.get(ex.key)
        j = first_loss_index(ex.labels, ignore)
        ids_ = (item or {}).get("chunk_ids") or []
        if item is None or j is None or not ids_ or any(c not in chunks for c in ids_):
            skipped += 1
            continue
        context = render_chunks([(c, chunks[c].text) for c in ids_])
        prefix, tail = teacher_prefix(lm.tokenizer, item, ex.ids, j, context), ex.ids[j:]
        sigs[ex.key] = _signature(prefix, tail)
        rec = done.get(ex.key)
        same = rec is not None and rec.get("sig") == sigs[ex.key]
        states = _read_hidden(folder, sigs[ex.key]) if hidden and same else None
        if same and (states is not None or not hidden):
            result[ex.key] = Teacher(rec["ids"], rec["logprobs"], states)
        else:
            groups.setdefault((tuple(ids_), "messages" in item), []).append((ex.key, prefix, tail))
    todo = sum(len(g) for g in groups.values())
    if skipped and show:
        note(f"engrain: distillation: {skipped} examples have no source chunk in the corpus; they keep the "
             "next-token loss alone")
    if not todo:
        return result
    if show:
        note(f"engrain: distillation: computing teacher targets for {todo} examples (once; cached in {path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    model, was_training = lm.model, lm.model.training
    model.eval()
    finished = 0
    with Progress(show, todo, 0, "distill teacher") as bar, open(path, "a", encoding="utf-8") as f, torch.no_grad():
        for jobs in groups.values():
            for (key, _, _), t in zip(jobs, _run_group(model, jobs, top_k, lm.tokenizer.pad_token_id, hidden)):
                result[key] = t
                if t.hidden is not None:  # before its line: a line read back always has its states on disk
                    _write_hidden(folder, sigs[key], t.hidden)
                f.write(json.dumps({"key": key, "sig": sigs[key], "ids": t.ids, "logprobs": t.logprobs}) + "\n")
            f.flush()  # a group at a time: a crash loses at most the group in flight
            finished += len(jobs)
            bar.update(finished)
    model.train(was_training)
    return result


def self_targets(lm: LM, examples: list, top_k: int, ignore: int, bf16: bool = False,
                 show: bool = False) -> list[Teacher | None]:
    """The base model's own top-k at every loss position of each example, with nothing added to its prompt: the
    target that keeps a trained memory's answers to general requests where the base model's were (the KL-to-base
    term on replay, ``train.replay_kl``). Computed before the memory is attached; examples repeating one item
    (replay cycles through a small pool) are run once.

    The examples run ``BATCH`` at a time in order of length (little padding), their shared chat-template start once,
    and with ``bf16`` under bf16 autocast: the precision the run trains in, so the target is the distribution the
    student starts from. ``bench/bench_self_targets.py`` times this against one example at a time in fp32."""
    import torch

    from .precision import bf16_autocast

    model, was_training = lm.model, lm.model.training
    model.eval()
    jobs: dict[tuple, tuple[str, list[int], list[int]]] = {}  # an example's ids -> (key, prompt, answer)
    for ex in examples:
        j = first_loss_index(ex.labels, ignore)
        if j is not None:
            jobs.setdefault(tuple(ex.ids), (ex.key, ex.ids[:j], ex.ids[j:]))
    ordered = sorted(jobs, key=len)
    device = str(next(model.parameters()).device)
    done: dict[tuple, Teacher] = {}
    step = BATCH * 4  # examples per progress update
    with Progress(show, len(ordered), 0, "replay targets") as bar, torch.no_grad(), bf16_autocast(device, bf16):
        for b in range(0, len(ordered), step):
            part = ordered[b:b + step]
            done.update(zip(part, _run_group(model, [jobs[ids] for ids in part], top_k, lm.tokenizer.pad_token_id)))
            bar.update(b + len(part))
    model.train(was_training)
    return [done.get(tuple(ex.ids)) for ex in examples]

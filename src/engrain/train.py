"""One training loop for every parametric memory (lora, full, prefix, memory), top to bottom:

1. data      every ``WS/synth/*.jsonl`` line becomes token ids + labels: chat items ({"messages": [...]}) are
             rendered with ``models.chat_prompt`` (the same template ``answer()`` uses at inference) and take loss
             on the final assistant answer only; text items ({"text": ...}) take next-token loss on every token.
             A stable hash of each item's id holds a small slice out for validation.
2. replay    a share of general data is mixed in against forgetting: the base model's own greedy answers to
             general prompts (self-distillation, generated once and cached in the workspace) and, when enabled,
             the general text the project ships.
3. packing   examples are shuffled per epoch (seeded) and packed into rows of up to ``seq_len`` tokens with no
             padding; position ids restart at 0 for each example, and ``packed_attention`` computes each
             example's causal attention block alone, so attention never crosses examples and costs only the
             blocks. Logits are computed only where a loss is taken. With ``distill`` > 0 the loss also matches
             the base model's distribution with the item's source chunks in view (``distill.py``).
4. loop      AdamW, cosine schedule with warm-up, gradient accumulation, clipping, optional bf16 autocast,
             ``accelerate`` for DDP (a no-op in one process). The loss of a step is the sum of token losses over
             the whole global batch divided by its number of loss tokens, so any split of a global batch over
             micro-batches and processes gives the same gradient.
5. state     checkpoints every N steps (trainable weights, optimizer, scheduler, RNG states; written to a temporary
             folder and renamed), resume with the same data order, refuse a resumed run whose config changed
             (unless ``force``), validation loss each eval interval, optional early stopping, and at the end the
             memory is saved to ``WS/memories/<name>/`` by its kind (see ``memory/parametric.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import write_json, write_jsonl
from .config import TrainConfig
from .errors import EngrainError
from .head_loss import fused_head_loss, head_of, hidden_instead_of_logits
from .models import DEFAULT_SYSTEM, LM, chat_messages, chat_prompt, end_of_turn
from .progress import Progress
from .workspace import Workspace

IGNORE = -100
# Config keys that change how a run is operated but not what it computes: a resume may change them freely.
OPERATIONAL_KEYS = {"save_every", "keep_checkpoints", "eval_every"}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# 1. Data: synthetic JSONL -> token ids and labels
# --------------------------------------------------------------------------------------------------


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken
    key: str  # stable identity (item id or file:line): decides the validation split
    kind: str = "synth"  # "synth" or "replay"
    teacher: object | None = None  # distill.Teacher: the teacher's top-k at each loss position
    teacher_weight: float = 0.0  # share of the loss matched to the teacher (train.distill, or train.replay_kl)

    @property
    def n_loss(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def render_messages(tokenizer, messages: list[dict]) -> tuple[str, str]:
    """(prompt text, answer text) for a chat item: the prompt is exactly what ``models.answer`` feeds the model
    for the same question (same template, same default system message), the answer ends with the end of turn."""
    prompt_msgs = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    if prompt_msgs[0]["role"] != "system":
        # chat_messages() adds the default system message at inference; training must see the same prompt.
        prompt_msgs = chat_messages("", system=DEFAULT_SYSTEM)[:1] + prompt_msgs
    prompt = chat_prompt(tokenizer, prompt_msgs, add_generation_prompt=True)
    return prompt, messages[-1]["content"].strip() + end_of_turn(tokenizer)


def _check_item(item, where: str) -> None:
    """Raise EngrainError naming file:line when an item is neither a chat item nor a text item."""
    if not isinstance(item, dict):
        raise EngrainError(f"{where}: expected a JSON object, got {type(item).__name__}.",
                           hint='Each line must be {"messages": [...]} or {"text": "..."}.')
    if "messages" in item:
        msgs = item["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise EngrainError(f"{where}: 'messages' must be a list of at least a user and an assistant message.")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise EngrainError(f"{where}: messages[{j}] must be an object with string 'role' and 'content'.")
            if m["role"] not in ("system", "user", "assistant"):
                raise EngrainError(f"{where}: messages[{j}].role is '{m['role']}'; use system, user or assistant.")
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            raise EngrainError(f"{where}: the last message must be a non-empty assistant answer (the loss is on it).")
        if not any(m["role"] == "user" for m in msgs[:-1]):
            raise EngrainError(f"{where}: no user message before the assistant answer.")
    elif "text" in item:
        if not isinstance(item["text"], str) or not item["text"].strip():
            raise EngrainError(f"{where}: 'text' must be a non-empty string.")
    else:
        raise EngrainError(f"{where}: the item has neither 'messages' nor 'text'.",
                           hint='Each line must be {"messages": [...]} or {"text": "..."} (plus provenance fields).')


def encode_item(tokenizer, item: dict, key: str, kind: str = "synth") -> Example:
    """Token ids and labels of one (already checked) item."""
    if "messages" in item:
        prompt, answer = render_messages(tokenizer, item["messages"])
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        return Example(p + a, [IGNORE] * len(p) + a, key, kind)
    ids = tokenizer(item["text"].strip(), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    labels = list(ids)
    labels[0] = IGNORE  # nothing precedes the first token, so it is never predicted (also inside a packed row)
    return Example(ids, labels, key, kind)


def read_synthetic(ws: Workspace) -> list[tuple[str, dict]]:
    """(key, item) for every line of every ``WS/synth/*.jsonl``, in file then line order; EngrainError on bad data."""
    files = sorted(ws.synth_dir.glob("*.jsonl")) if ws.synth_dir.is_dir() else []
    if not files:
        raise EngrainError(f"No synthetic data: {ws.synth_dir} holds no *.jsonl files.",
                           hint=f"Make some first: engrain synth -w {ws.root}")
    items: list[tuple[str, dict]] = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    item = json.loads(line)
                except ValueError as exc:
                    raise EngrainError(f"{where}: not valid JSON ({exc}).",
                                       hint="Fix or delete that line, or regenerate the file with engrain synth.")
                _check_item(item, where)
                items.append((str(item.get("id") or f"{path.name}:{lineno}"), item))
    if not items:
        raise EngrainError(f"The synthetic data in {ws.synth_dir} is empty ({', '.join(p.name for p in files)}).",
                           hint=f"Regenerate it: engrain synth -w {ws.root}")
    return items


def is_validation(key: str, fraction: float) -> bool:
    """A stable split: the same item is held out whatever the file order or the number of processes."""
    return _unit_hash(key) < fraction


def _unit_hash(key: str) -> float:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def fact_group(key: str, item: dict) -> tuple[str, bool]:
    """(what the validation split holds out together, whether this item asks about its fact).

    A ``facts`` item names the sentence it is about: every question on a held-out sentence, in every wording,
    stays out of training, while the sentence's statements (the sentence itself, its reversals, the shuffled
    passages) stay in. Validation then asks what a user asks: facts the memory read but was never quizzed on
    (Physics of Language Models 3.1 evaluates knowledge extraction the same way). Any other item is its own group
    and, when held out, leaves training whole (as before)."""
    from .synth.facts import fact_of, is_question

    variant = str(item.get("variant") or "")
    if item.get("strategy") == "facts":
        fact = fact_of(variant)
        if fact is None:
            return key, False  # a whole chunk's passage: training only
        chunk = "+".join(item.get("chunk_sha256") or item.get("chunk_ids") or [key])
        return f"{chunk}:{fact}", is_question(variant)
    return key, True


def split_examples(examples: list[Example], items: dict[str, dict], fraction: float,
                   max_val: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): whole facts held out (see ``fact_group``), chosen by a stable hash until ``max_val``
    questions are held out."""
    if fraction <= 0 or len(examples) < 10:
        return examples, []
    groups = {e.key: fact_group(e.key, items.get(e.key, {})) for e in examples}
    chosen: set[str] = set()
    count = 0
    by_group: dict[str, int] = {}
    for group, asks in groups.values():
        by_group[group] = by_group.get(group, 0) + int(asks)
    for group in sorted((g for g in by_group if _unit_hash(g) < fraction and by_group[g]), key=_unit_hash):
        if count + by_group[group] > max_val and count:
            break
        chosen.add(group)
        count += by_group[group]
    val = [e for e in examples if groups[e.key][0] in chosen and groups[e.key][1]]
    held = {id(e) for e in val}
    return [e for e in examples if id(e) not in held], val


# --------------------------------------------------------------------------------------------------
# 2. Replay: general data mixed in against forgetting
# --------------------------------------------------------------------------------------------------


def _data_file(name: str) -> Path | None:
    path = Path(__file__).resolve().parent / "data" / name
    return path if path.is_file() else None


def replay_prompts() -> list[str]:
    """General prompts for self-distillation (shipped with the package; distinct from any evaluation set)."""
    path = _data_file("replay_prompts.txt")
    if path is None:
        return []
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]


def file_safe(name: str) -> str:
    """A model name as part of a cache file's name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def self_distill_items(ws: Workspace, lm: LM, max_new_tokens: int) -> list[dict]:
    """The base model's greedy answers to general prompts, generated once per model and cached in the workspace
    (training on its own outputs keeps the model close to itself on general requests)."""
    from .models import answer

    prompts = replay_prompts()
    if not prompts:
        return []
    cache = ws.root / "train" / "replay" / f"self-distill-{file_safe(lm.name)}-{max_new_tokens}.jsonl"
    if cache.is_file():
        rows = [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(rows) == len(prompts):
            return rows
    _log(f"engrain: generating self-distillation replay data ({len(prompts)} general prompts, once; cached in {cache})")
    gens = answer(lm, prompts, max_new_tokens=max_new_tokens)
    rows = [{"id": f"replay-sd-{i}", "strategy": "self-distill", "generator": lm.name,
             "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": g.text}]}
            for i, (p, g) in enumerate(zip(prompts, gens))]  # an empty answer is the model's behaviour too
    write_jsonl(cache, rows)
    return rows


def general_text_items() -> list[dict]:
    """Paragraphs of the general reference text the project ships (absent: none)."""
    path = _data_file("general_text.txt")
    if path is None:
        return []
    paras = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if len(p.strip()) > 40]
    return [{"id": f"replay-gt-{i}", "strategy": "general-text", "text": p} for i, p in enumerate(paras)]


def replay_examples(ws: Workspace, lm: LM, cfg: TrainConfig, n_train: int) -> list[Example]:
    """``replay_share`` of the final mix, drawn (seeded, cycling) from the enabled replay sources."""
    if cfg.replay_share <= 0 or n_train == 0:
        return []
    pool: list[dict] = []
    for source in cfg.replay_sources:
        if source == "self_distill":
            pool += self_distill_items(ws, lm, cfg.replay_max_new_tokens)
        elif source == "general_text":
            pool += general_text_items()
        else:
            raise EngrainError(f"Unknown replay source '{source}' in train.replay_sources.",
                               hint="Use self_distill and/or general_text.")
    if not pool:
        _log("engrain: no replay data available (no shipped prompts or text); training without replay")
        return []
    want = round(n_train * cfg.replay_share / (1.0 - cfg.replay_share))
    rng = random.Random(cfg.seed)
    order = list(range(len(pool)))
    rng.shuffle(order)
    picked = [pool[order[i % len(pool)]] for i in range(want)]
    return [encode_item(lm.tokenizer, item, f"{item['id']}#{i}", kind="replay") for i, item in enumerate(picked)]


# --------------------------------------------------------------------------------------------------
# 3. Packing and batches
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    ids: list[int]
    labels: list[int]
    positions: list[int]
    # the teacher's (top-k ids, log-probs) at each loss position in order, None where an example has no teacher
    teacher: list[tuple[list[int], list[float]] | None] = field(default_factory=list)

    @property
    def n_loss(self) -> int:
        # Loss is taken at position t for label t+1, so the first label of a row is never a target.
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def _teacher_entries(ex: Example, labels: list[int]) -> list[tuple[list[int], list[float], float] | None]:
    """The teacher's targets (ids, log-probs, weight) for the loss positions left in ``labels`` (the example's,
    perhaps truncated)."""
    n = sum(1 for x in labels if x != IGNORE)
    if ex.teacher is None or ex.teacher_weight <= 0:
        return [None] * n
    return [(i, lp, ex.teacher_weight) for i, lp in zip(ex.teacher.ids[:n], ex.teacher.logprobs[:n])]


def pack(examples: list[Example], seq_len: int) -> list[Row]:
    """Greedy packing in the given order: append examples to the current row until the next does not fit.
    Rows are not padded here: a row that is not full stays short, and collation pads a micro-batch only to its
    longest row (with one micro-batch row, nothing at all)."""
    rows: list[Row] = []
    cur = Row([], [], [])

    def close() -> None:
        if cur.ids:
            rows.append(cur)

    for ex in examples:
        ids, labels = ex.ids[:seq_len], ex.labels[:seq_len]
        if len(cur.ids) + len(ids) > seq_len:
            close()
            cur = Row([], [], [])
        cur.ids.extend(ids)
        cur.labels.extend(labels)
        cur.positions.extend(range(len(ids)))
        cur.teacher.extend(_teacher_entries(ex, labels))
    close()
    return rows


def unpacked_rows(examples: list[Example], seq_len: int) -> list[Row]:
    """One example per row (for kinds that cannot take packed rows); padding happens at collation."""
    return [Row(e.ids[:seq_len], e.labels[:seq_len], list(range(min(len(e.ids), seq_len))),
                _teacher_entries(e, e.labels[:seq_len])) for e in examples]


def epoch_rows(examples: list[Example], epoch: int, cfg: TrainConfig, packing: bool) -> list[Row]:
    order = list(range(len(examples)))
    random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
    shuffled = [examples[i] for i in order]
    return pack(shuffled, cfg.seq_len) if packing else unpacked_rows(shuffled, cfg.seq_len)


def global_batches(examples: list[Example], cfg: TrainConfig, rows_per_step: int, packing: bool):
    """An endless, deterministic stream of (epoch, global batch of rows): the same for every process and every
    resume. A last partial batch of an epoch is filled with rows from that epoch's start."""
    epoch = 0
    while True:
        rows = epoch_rows(examples, epoch, cfg, packing)
        for start in range(0, len(rows), rows_per_step):
            batch = rows[start:start + rows_per_step]
            if len(batch) < rows_per_step:
                batch = batch + [rows[i % len(rows)] for i in range(rows_per_step - len(batch))]
            yield epoch, batch
        epoch += 1


def steps_per_epoch(examples: list[Example], cfg: TrainConfig, rows_per_step: int, packing: bool) -> int:
    return max(1, math.ceil(len(epoch_rows(examples, 0, cfg, packing)) / rows_per_step))


def collate(rows: list[Row], pad_id: int, packing: bool, device) -> dict:
    """Tensors for one micro-batch, right-padded to its longest row. Packed: no attention mask (position ids mark
    the examples; a row's padding counts on from 0 as one more sequence that takes no loss). Unpacked: an attention
    mask."""
    import torch

    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.ids)
        ids[i, :n] = torch.tensor(r.ids)
        labels[i, :n] = torch.tensor(r.labels)
        pos[i, :n] = torch.tensor(r.positions)
        pos[i, n:] = torch.arange(width - n)
        mask[i, :n] = 1
    batch = {"input_ids": ids.to(device), "labels": labels.to(device), "position_ids": pos.to(device)}
    if not packing:
        batch["attention_mask"] = mask.to(device)
    entries = [t for r in rows for t in r.teacher]  # in the order loss_sum takes the loss positions
    if any(t is not None for t in entries):
        k = len(next(t for t in entries if t is not None)[0])
        t_ids = torch.zeros((len(entries), k), dtype=torch.long)
        t_lp = torch.full((len(entries), k), -1e9)
        has = torch.zeros(len(entries))  # the teacher's weight at each position (0: none)
        for i, t in enumerate(entries):
            if t is not None:
                t_ids[i], t_lp[i], has[i] = torch.tensor(t[0]), torch.tensor(t[1]), t[2]
        batch["teacher"] = (t_ids.to(device), t_lp.to(device), has.to(device))
    return batch


def loss_sum(module, batch: dict, packing: bool, distill: float = 0.0):
    """Sum of the token losses over the batch's loss tokens (and how many there are): next-token cross-entropy,
    and where the batch carries teacher targets and ``distill`` > 0, (1 - w) x that + w x the cross-entropy
    against the teacher's top-k distribution (renormalised over its k tokens), w = ``distill`` x the position's
    teacher weight (``collate``: train.distill on synthetic items, train.replay_kl on replay)."""
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE  # logits at t predict token t+1
    targets = labels[:, 1:][keep[:, :-1]]
    teacher = batch.get("teacher") if distill > 0 else None
    if packing:
        from .packed_attention import packed_rows

        # The head and the loss run together on slices of the final hidden states (head_loss.py), never holding
        # the full positions x vocabulary logits, wherever the head is a plain linear layer.
        head = head_of(module)
        fused = type(head) is torch.nn.Linear and head.bias is None
        with packed_rows(module), hidden_instead_of_logits(head) if fused else contextlib.nullcontext():
            # each example's attention block alone, not the whole row's
            out = module(input_ids=batch["input_ids"], attention_mask=None, position_ids=batch["position_ids"],
                         use_cache=False, logits_to_keep=keep)
        logits = out.logits.reshape(-1, out.logits.shape[-1])  # the final hidden states where the head is fused
        if fused:
            return fused_head_loss(logits, head.weight, targets, teacher, distill), int(targets.numel())
    else:
        out = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[keep]
    if teacher is None:
        return F.cross_entropy(logits.float(), targets, reduction="sum"), int(targets.numel())
    t_ids, t_lp, has = teacher
    w = distill * has.float()
    logp = torch.log_softmax(logits.float(), dim=-1)
    hard = -logp.gather(1, targets[:, None])[:, 0]
    soft = -(torch.softmax(t_lp, dim=-1) * logp.gather(1, t_ids)).sum(-1)
    mixed = (1 - w) * hard + w * soft
    return mixed.sum(), int(targets.numel())


# --------------------------------------------------------------------------------------------------
# 4. Schedule
# --------------------------------------------------------------------------------------------------


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------------
# 5. Checkpoints
# --------------------------------------------------------------------------------------------------


def run_dir(ws: Workspace, name: str) -> Path:
    return ws.root / "train" / name


def checkpoints(ws: Workspace, name: str) -> list[Path]:
    """Complete checkpoints, oldest first (a complete one has state.json; temporary folders start with '.')."""
    folder = run_dir(ws, name) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file())


def rng_states() -> dict:
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_states(states: dict) -> None:
    import numpy as np
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def save_checkpoint(ws: Workspace, name: str, step: int, module, optimizer, scheduler, state: dict, keep: int) -> Path:
    """Write everything a resume needs into a temporary folder, then rename it: a kill never leaves half a one."""
    import torch
    from safetensors.torch import save_file

    from .memory.parametric import trainable_state

    folder = run_dir(ws, name) / "checkpoints"
    final = folder / f"step-{step:07d}"
    tmp = folder / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(module), str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states()},
               tmp / "trainer.pt")
    write_json(tmp / "state.json", {**state, "step": step})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoints(ws, name)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path, module, optimizer, scheduler) -> dict:
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(folder / "trainable.safetensors"))
    params = dict(module.named_parameters())
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    trainer = torch.load(folder / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    set_rng_states(trainer["rng"])
    return json.loads((folder / "state.json").read_text())


def config_diff(old: dict, new: dict) -> list[str]:
    keys = sorted((set(old) | set(new)) - OPERATIONAL_KEYS)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What a run will do: the data, its size, the number of steps (what --dry-run prints)."""

    train: list[Example]
    val: list[Example]
    n_synth: int
    n_replay: int
    rows_per_step: int
    steps: int
    steps_per_epoch: int
    train_tokens_per_epoch: int
    loss_tokens_per_epoch: int
    truncated: int
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"examples": len(self.train), "synthetic": self.n_synth, "replay": self.n_replay,
                "validation": len(self.val), "steps": self.steps, "steps_per_epoch": self.steps_per_epoch,
                "rows_per_step": self.rows_per_step, "tokens_per_epoch": self.train_tokens_per_epoch,
                "loss_tokens_per_epoch": self.loss_tokens_per_epoch, "truncated_examples": self.truncated,
                **self.extra}


def make_plan(ws: Workspace, lm: LM, cfg: TrainConfig, world: int, packing: bool, *, teacher: bool = True,
              show: bool = True) -> Plan:
    """The run's data and size. With ``cfg.distill`` > 0 and ``teacher``, the training examples get their teacher
    targets (computed with ``lm`` before any memory is attached, or read from the workspace's cache)."""
    items = read_synthetic(ws)
    examples = [encode_item(lm.tokenizer, item, key) for key, item in items]
    train, val = split_examples(examples, dict(items), cfg.val_fraction, cfg.val_max)
    extra = {}
    if cfg.distill > 0:
        with_chunks = sum(1 for key, item in items if item.get("chunk_ids"))
        extra["distill"] = {"weight": cfg.distill, "top_k": cfg.distill_top_k, "items_with_chunks": with_chunks}
        if teacher:
            from .distill import teacher_targets

            targets = teacher_targets(ws, lm, train, dict(items), cfg.distill_top_k, IGNORE, show)
            for ex in train:
                ex.teacher, ex.teacher_weight = targets.get(ex.key), cfg.distill
            extra["distill"]["examples_with_teacher"] = len(targets)
    replay = replay_examples(ws, lm, cfg, len(train))
    if replay and cfg.replay_kl > 0 and teacher:
        from .distill import self_targets

        for ex, target in zip(replay, self_targets(lm, replay, cfg.distill_top_k, IGNORE)):
            ex.teacher, ex.teacher_weight = target, cfg.replay_kl
        extra["replay_kl"] = cfg.replay_kl
    train = train + replay
    rows_per_step = cfg.micro_batch * cfg.grad_accum * world
    if rows_per_step % world:
        raise EngrainError("The global batch must split evenly over processes.")
    spe = steps_per_epoch(train, cfg, rows_per_step, packing)
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * spe))
    return Plan(train=train, val=val, n_synth=len(items) - len(val), n_replay=len(replay), rows_per_step=rows_per_step,
                steps=steps, steps_per_epoch=spe,
                train_tokens_per_epoch=sum(min(len(e.ids), cfg.seq_len) for e in train),
                loss_tokens_per_epoch=sum(e.n_loss for e in train),
                truncated=sum(1 for e in train if len(e.ids) > cfg.seq_len), extra=extra)


def run_config(cfg: TrainConfig, lm: LM) -> dict:
    """The settings a resume must match: the train section plus the base model."""
    return {**cfg.model_dump(), "base_model": lm.name}


def evaluate_loss(module, val_rows: list[Row], cfg: TrainConfig, pad_id: int, packing: bool, device) -> float | None:
    import torch

    if not val_rows:
        return None
    was_training = module.training
    module.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(val_rows), cfg.micro_batch):
            s, n = loss_sum(module, collate(val_rows[i:i + cfg.micro_batch], pad_id, packing, device), packing)
            total, count = total + float(s), count + n
    module.train(was_training)
    return total / max(1, count)


ANSWER_HEAD = 8  # answer tokens that must come out right for a held-out question to count as answered


def answered_share(module, examples: list[Example], tokenizer, device, batch: int = 8) -> float | None:
    """Share of the held-out questions whose answer greedy decoding gives, closed-book: the model's most likely
    token is the answer's at each of its first ``ANSWER_HEAD`` positions, read from one teacher-forced
    forward per batch, so it costs a validation pass, not a generation. Choosing the checkpoint by it picks the
    memory that answers facts it was never quizzed on, which item loss does not measure. None without questions."""
    import torch

    from .distill import first_loss_index

    asks = [e for e in examples if (first_loss_index(e.labels, IGNORE) or 0) > 1]
    if not asks:
        return None
    n_end = len(tokenizer(end_of_turn(tokenizer), add_special_tokens=False)["input_ids"])
    was_training = module.training
    module.eval()
    right = 0
    with torch.no_grad():
        for b in range(0, len(asks), batch):
            part = asks[b:b + batch]
            width = max(len(e.ids) for e in part)
            ids = torch.full((len(part), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for i, e in enumerate(part):
                ids[i, :len(e.ids)], mask[i, :len(e.ids)] = torch.tensor(e.ids), 1
            guess = module(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.argmax(-1).cpu()
            for i, e in enumerate(part):
                j = first_loss_index(e.labels, IGNORE)
                # the answer's first ANSWER_HEAD tokens (a long completion's tail is not the fact), no end of turn
                stop = min(max(j + 1, len(e.ids) - n_end), j + ANSWER_HEAD)
                right += int(torch.equal(guess[i, j - 1:stop - 1], torch.tensor(e.ids[j:stop])))
    module.train(was_training)
    return right / len(asks)


def bf16_autocast(device: str, enabled: bool):
    import torch

    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if str(device).startswith("cuda") else "cpu", dtype=torch.bfloat16)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system at once.

    By default glibc gives blocks above 32 MB to the system on free (and trims its heap when the top stays free),
    so a training step, which frees and allocates the same 50 MB head slices and activations again and again, pays
    page faults and the kernel's zeroing for every one. It made the bf16 LoRA step 1.09x faster (3.66 -> 3.35 s:
    ``python bench/bench_step_parts.py lora 3 --glibc-default`` against the same without the flag). The cost:
    up to 1 GB of freed memory stays with the process. Returns whether the setting took (glibc only)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3  # from malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 256 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def use_bf16(setting: str, device: str) -> bool:
    from .models import bf16_supported

    if setting == "on":
        return True
    if setting == "off":
        return False
    # auto: only where bf16 is native (CUDA Ampere+, CPUs with AMX/AVX512-BF16); elsewhere it is emulated and slower.
    return bf16_supported(str(device))


def train(ws: Workspace, cfg: TrainConfig, model_spec: str | None = None, *, name: str | None = None,
          force: bool = False, dry_run: bool = False, show_progress: bool = True, lm: LM | None = None) -> dict:
    """Train ``cfg.memory`` on the workspace's synthetic data; returns the run's summary (also in the memory's
    ``engrain_memory.json``). Resumes from the last checkpoint of an interrupted run with the same config."""
    import torch
    from accelerate import Accelerator

    from .memory.parametric import META_FILE, get_kind, model_fingerprint, trainable_state
    from .models import load_model

    kind = get_kind(cfg.memory)
    name = name or cfg.name or cfg.memory
    keep_freed_memory()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    is_main = accelerator.is_main_process
    show = show_progress and is_main
    packing = bool(getattr(kind, "packing", True)) and cfg.packing

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    lm = lm or load_model(model_spec, device=str(device), dtype="float32")
    runcfg = run_config(cfg, lm)
    out_dir = ws.memory_dir(name)

    # A finished memory with the same config is not trained twice; with another config only under --force.
    if not dry_run and not force and (out_dir / META_FILE).is_file():
        meta = json.loads((out_dir / META_FILE).read_text())
        diff = config_diff(meta.get("config", {}), runcfg)
        if not diff:
            if show:
                _log(f"engrain: {out_dir} is already trained with this config; nothing to do (--force to retrain)")
            return {**meta, "already_trained": True}
        raise EngrainError(f"{out_dir} was trained with another config:\n  " + "\n  ".join(diff),
                           hint="Pass --force to train it again with the new config (the old one is replaced).")

    with accelerator.main_process_first():  # replay data is generated and cached once, by the main process
        plan = make_plan(ws, lm, cfg, world, packing, teacher=not dry_run, show=show)
    lr = cfg.lr if cfg.lr is not None else float(getattr(kind, "default_lr", 1e-4))
    if dry_run:
        return dry_run_report(ws, lm, kind, cfg, plan, lr, packing, device)

    # Resume, or start over: checkpoints of another config are refused unless forced (then discarded).
    ckpts = checkpoints(ws, name)
    resume_from = None
    if ckpts:
        state = json.loads((ckpts[-1] / "state.json").read_text())
        diff = config_diff(state.get("config", {}), runcfg)
        if diff and not force:
            raise EngrainError(f"An interrupted run of '{name}' (step {state['step']}) used another config:\n  "
                               + "\n  ".join(diff),
                               hint="Run with the same settings to resume it, or pass --force to start over.")
        if diff:
            accelerator.wait_for_everyone()
            if is_main:
                shutil.rmtree(run_dir(ws, name) / "checkpoints", ignore_errors=True)
            accelerator.wait_for_everyone()
        else:
            resume_from = ckpts[-1]

    module = kind.attach(lm.model, lm.tokenizer, cfg.model_dump(), ws)
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    make_opt = getattr(kind, "make_optimizer", None)
    optimizer = (make_opt(module, lr, cfg.weight_decay) if make_opt else
                 torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98)))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * plan.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, plan.steps, cfg.min_lr_ratio))

    start_step, best_val, best_step, bad_evals, history = 0, None, None, 0, []
    best_score = None  # (held-out facts answered, -validation loss) of the best evaluation: higher is better
    best_weights = None
    # Training time and tokens of the runs before a resume (up to their last checkpoint), so the summary's
    # train_seconds is the build time of the whole memory, not of its last stretch.
    seconds_before, tokens_before = 0.0, 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, module, optimizer, scheduler)
        start_step, best_val, best_step = state["step"], state.get("best_val"), state.get("best_step")
        bad_evals, history = state.get("bad_evals", 0), state.get("history", [])
        best_score = tuple(state["best_score"]) if state.get("best_score") else None
        seconds_before, tokens_before = state.get("train_seconds", 0.0), state.get("train_tokens", 0)
        if (resume_from / "best.safetensors").is_file():
            from safetensors.torch import load_file

            best_weights = load_file(str(resume_from / "best.safetensors"))
        if show:
            _log(f"engrain: resuming '{name}' from step {start_step} ({resume_from})")

    model = accelerator.prepare(module)  # DDP wrapper under `accelerate launch`; the module itself otherwise
    pad_id = lm.tokenizer.pad_token_id
    val_rows = (pack(plan.val, cfg.seq_len) if packing else unpacked_rows(plan.val, cfg.seq_len))
    bf16 = use_bf16(cfg.bf16, str(device))
    stream = global_batches(plan.train, cfg, plan.rows_per_step, packing)
    eval_every = cfg.eval_every or max(1, plan.steps_per_epoch // 4)
    for _ in range(start_step):  # the same data order as an uninterrupted run
        next(stream)

    progress = Progress(show, plan.steps, start_step, f"train {name}")
    t_start, tokens_seen, last_loss = time.time(), 0, float("nan")
    log_path = run_dir(ws, name) / "log.jsonl"
    stopped_early = False
    step = start_step
    with progress:
        while step < plan.steps:
            epoch, batch = next(stream)
            n_loss = sum(r.n_loss for r in batch)  # known to every process: the data stream is shared
            micro = [batch[i:i + cfg.micro_batch] for i in range(0, len(batch), cfg.micro_batch)]
            mine = micro[rank::world]  # each process takes every world-th micro-batch
            step_loss = 0.0
            for j, rows in enumerate(mine):
                tensors = collate(rows, pad_id, packing, device)
                sync = j == len(mine) - 1
                ctx = accelerator.no_sync(model) if not sync else contextlib.nullcontext()
                with ctx, bf16_autocast(str(device), bf16):
                    s, _ = loss_sum(model, tensors, packing, 1.0)  # each position's teacher weight is in the batch
                    # DDP averages gradients over processes; scaling by world turns that into the global sum.
                    loss = s * world / max(1, n_loss)
                loss.backward()
                step_loss += float(s.detach())
                tokens_seen += sum(len(r.ids) for r in rows)
            hook = getattr(kind, "sparse_grad_hook", None)
            if hook is not None:
                hook(accelerator.unwrap_model(model))
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            # Loss of the whole global batch (summed over processes) for logging.
            step_loss_t = accelerator.reduce(torch.tensor([step_loss], device=device), reduction="sum")
            last_loss = float(step_loss_t[0]) / max(1, n_loss)
            elapsed = time.time() - t_start
            tok_s = tokens_seen * world / max(1e-9, elapsed)
            record = {"step": step, "epoch": epoch, "loss": round(last_loss, 5), "lr": scheduler.get_last_lr()[0],
                      "tokens_per_s": round(tok_s, 1), "seconds": round(seconds_before + elapsed, 1)}

            if (step % eval_every == 0 or step == plan.steps) and val_rows:
                inner = accelerator.unwrap_model(model)
                val = evaluate_loss(inner, val_rows, cfg, pad_id, packing, device)
                with bf16_autocast(str(device), bf16):
                    answered = answered_share(inner, plan.val, lm.tokenizer, device)
                record["val_loss"] = round(val, 5)
                if answered is not None:
                    record["val_answered"] = round(answered, 4)
                score = (answered or 0.0, -round(val, 6))
                if best_score is None or score > best_score:
                    best_val, best_step, best_score, bad_evals = val, step, score, 0
                    if cfg.keep_best:
                        best_weights = {k: v.clone() for k, v in trainable_state(accelerator.unwrap_model(model)).items()}
                else:
                    bad_evals += 1
                if cfg.early_stopping_patience and bad_evals >= cfg.early_stopping_patience:
                    stopped_early = True
            history.append(record)
            if is_main:
                with open(log_path.parent.mkdir(parents=True, exist_ok=True) or log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            shown_val = record.get("val_loss")
            progress.update(step, f"loss {last_loss:.3f} · {tok_s:,.0f} tok/s"
                            + (f" · val {shown_val:.3f}" if shown_val is not None else ""))

            if cfg.save_every and step % cfg.save_every == 0 and step < plan.steps and not stopped_early:
                accelerator.wait_for_everyone()
                if is_main:
                    state = {"config": runcfg, "best_val": best_val, "best_step": best_step, "bad_evals": bad_evals,
                             "best_score": list(best_score) if best_score else None,
                             "history": history[-1000:], "train_seconds": seconds_before + time.time() - t_start,
                             "train_tokens": tokens_before + tokens_seen * world}
                    ck = save_checkpoint(ws, name, step, accelerator.unwrap_model(model), optimizer, scheduler,
                                         state, cfg.keep_checkpoints)
                    if best_weights is not None:
                        from safetensors.torch import save_file

                        # Written after the rename; a resume without it keeps the final weights instead.
                        save_file(best_weights, str(ck / "best.safetensors"))
                accelerator.wait_for_everyone()
            if stopped_early:
                break

    seconds = time.time() - t_start
    module = accelerator.unwrap_model(model)
    if cfg.keep_best and best_weights is not None:
        with torch.no_grad():
            named = dict(module.named_parameters())
            for k, v in best_weights.items():
                named[k].copy_(v)
    summary = {"memory": name, "kind": kind.name, "base_model": lm.name, "base_model_path": lm.path,
               "base_fingerprint": model_fingerprint(lm.model),
               "steps": step, "planned_steps": plan.steps, "stopped_early": stopped_early,
               "resumed_from_step": start_step if resume_from else None, "learning_rate": lr,
               "train_seconds": round(seconds_before + seconds, 2), "train_tokens": tokens_before + tokens_seen * world,
               "tokens_per_s": round(tokens_seen * world / max(1e-9, seconds), 1),
               "final_train_loss": round(last_loss, 5), "best_val_loss": best_val, "best_val_step": best_step,
               "best_val_answered": best_score[0] if best_score else None, "kept_weights_of_step":
                   best_step if cfg.keep_best and best_weights is not None else step,
               "trainable_params": n_trainable, "processes": world, "bf16": bf16, "packing": packing,
               "data": plan.summary(), "config": runcfg, "out": str(out_dir)}
    accelerator.wait_for_everyone()
    if is_main:
        save_memory(ws, name, kind, module, summary)
        shutil.rmtree(run_dir(ws, name) / "checkpoints", ignore_errors=True)
    accelerator.wait_for_everyone()
    return summary


def save_memory(ws: Workspace, name: str, kind, module, meta: dict) -> Path:
    """Save into a temporary folder, write the meta file last, then swap it into place."""
    final = ws.memory_dir(name)
    tmp = ws.memories_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kind.save(module, tmp, meta)
    from .memory.parametric import META_FILE

    write_json(tmp / META_FILE, meta)
    old = ws.memories_dir / f".{name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------------
# Dry run
# --------------------------------------------------------------------------------------------------


def dry_run_report(ws: Workspace, lm: LM, kind, cfg: TrainConfig, plan: Plan, lr: float, packing: bool,
                   device) -> dict:
    """Steps, tokens, time measured on a few real micro-steps, and predicted peak memory against available RAM."""
    import resource

    import psutil
    import torch

    module = kind.attach(lm.model, lm.tokenizer, cfg.model_dump(), ws)
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    pad_id = lm.tokenizer.pad_token_id
    epoch0 = epoch_rows(plan.train, 0, cfg, packing)
    rows = epoch0[:cfg.micro_batch * 3]
    micro = [rows[i:i + cfg.micro_batch] for i in range(0, len(rows), cfg.micro_batch)]
    times, toks = [], []
    for j, m in enumerate(micro):
        batch = collate(m, pad_id, packing, device)
        t0 = time.perf_counter()
        s, _ = loss_sum(module, batch, packing)
        s.backward()
        if j > 0:  # the first one warms up allocators and kernels
            times.append(time.perf_counter() - t0)
            toks.append(sum(len(r.ids) for r in m))
    for p in params:
        p.grad = None
    tok_s = sum(toks) / max(1e-9, sum(times)) if times else float("nan")
    total_tokens = plan.steps * plan.rows_per_step * sum(len(r.ids) for r in epoch0) / max(1, len(epoch0))
    optimizer_bytes = n_trainable * 4 * 2  # AdamW: two fp32 moments per trained weight
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    predicted = peak_rss + optimizer_bytes
    vm = psutil.virtual_memory()
    budget = vm.available + psutil.Process().memory_info().rss
    report = {"dry_run": True, "memory": kind.name, "learning_rate": lr, "trainable_params": n_trainable,
              **plan.summary(), "total_tokens": int(total_tokens), "measured_tokens_per_s": round(tok_s, 1),
              "estimated_seconds": round(total_tokens / tok_s, 1) if tok_s == tok_s and tok_s > 0 else None,
              "predicted_peak_memory_mb": round(predicted / 2**20), "available_memory_mb": round(budget / 2**20),
              "oom_risk": predicted > budget}
    if report["oom_risk"]:
        _log(f"engrain: WARNING: predicted peak memory {report['predicted_peak_memory_mb']} MB exceeds the "
             f"{report['available_memory_mb']} MB available: out-of-memory risk. Lower train.micro_batch or "
             "train.seq_len, or use lora instead of full.")
    return report

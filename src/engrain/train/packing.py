"""Examples packed into rows and the loss of a batch.

Examples are shuffled per epoch (seeded) and packed into rows of up to ``seq_len`` tokens with no padding; position
ids restart at 0 for each example, and ``kernels.packed_attention`` computes each example's causal attention block
alone, so attention never crosses examples. Logits are computed only where a loss is taken, and where an example has
teacher targets (``distill.py``, beside this module) part of its loss matches the teacher's top-k, and with teacher
hidden states (``train.distill_hidden``) a term matches the student's block outputs to the teacher's.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field

from ..config import TrainConfig
from .data import IGNORE, Example
from .distill import block_outputs
from .kernels.head_loss import fused_head_loss, head_of, hidden_instead_of_logits


@dataclass
class Row:
    ids: list[int]
    labels: list[int]
    positions: list[int]
    # the teacher's (top-k ids, log-probs) at each loss position in order, None where an example has no teacher
    teacher: list[tuple[list[int], list[float]] | None] = field(default_factory=list)
    # the teacher's hidden states (blocks, hidden size) and their weight at each loss position, None where none
    hidden: list[tuple[object, float] | None] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # each label's loss weight (train.fact_weight)

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


def _hidden_entries(ex: Example, labels: list[int]) -> list[tuple[object, float] | None]:
    """The teacher's hidden states (and their weight) for the loss positions left in ``labels``."""
    n = sum(1 for x in labels if x != IGNORE)
    states = getattr(ex.teacher, "hidden", None)
    if states is None or ex.hidden_weight <= 0:
        return [None] * n
    return [(states[i], ex.hidden_weight) for i in range(n)]


def pack(examples: list[Example], seq_len: int, pack_tokens: int | None = None) -> list[Row]:
    """Greedy packing in the given order: append examples (each cut at ``seq_len`` tokens) to the current row until
    the next would take it past ``pack_tokens`` (default ``seq_len``); an example longer than that fills a row alone.
    Rows are not padded here: a row that is not full stays short, and collation pads a micro-batch only to its
    longest row (with one micro-batch row, nothing at all)."""
    budget = pack_tokens or seq_len
    rows: list[Row] = []
    cur = Row([], [], [])

    def close() -> None:
        if cur.ids:
            rows.append(cur)

    for ex in examples:
        ids, labels = ex.ids[:seq_len], ex.labels[:seq_len]
        if len(cur.ids) + len(ids) > budget:
            close()
            cur = Row([], [], [])
        cur.ids.extend(ids)
        cur.labels.extend(labels)
        cur.positions.extend(range(len(ids)))
        cur.teacher.extend(_teacher_entries(ex, labels))
        cur.hidden.extend(_hidden_entries(ex, labels))
        cur.weights.extend(ex.weights[:seq_len] if ex.weights else [1.0] * len(ids))
    close()
    return rows


def unpacked_rows(examples: list[Example], seq_len: int) -> list[Row]:
    """One example per row (for kinds that cannot take packed rows); padding happens at collation."""
    return [Row(e.ids[:seq_len], e.labels[:seq_len], list(range(min(len(e.ids), seq_len))),
                _teacher_entries(e, e.labels[:seq_len]), _hidden_entries(e, e.labels[:seq_len]),
                e.weights[:seq_len] if e.weights else [1.0] * min(len(e.ids), seq_len)) for e in examples]


def epoch_rows(examples: list[Example], epoch: int, cfg: TrainConfig, packing: bool) -> list[Row]:
    order = list(range(len(examples)))
    random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
    shuffled = [examples[i] for i in order]
    return pack(shuffled, cfg.seq_len, cfg.pack_tokens) if packing else unpacked_rows(shuffled, cfg.seq_len)


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
    if any(w != 1.0 for r in rows for w in r.weights):
        weights = torch.ones((len(rows), width))
        for i, r in enumerate(rows):
            weights[i, :len(r.weights)] = torch.tensor(r.weights)
        batch["label_weights"] = weights.to(device)
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
    hidden = [h for r in rows for h in r.hidden]
    if any(h is not None for h in hidden):
        shape = next(h for h in hidden if h is not None)[0].shape
        zero = torch.zeros(shape, dtype=torch.bfloat16)
        states = torch.stack([zero if h is None else h[0] for h in hidden])
        weight = torch.tensor([0.0 if h is None else h[1] for h in hidden])
        batch["hidden"] = (states.to(device), weight.to(device))
    return batch


def loss_positions(labels):
    """(keep, targets): the positions whose logits are scored (logits at t predict token t+1), and the tokens they
    predict, in row-major order."""
    import torch

    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep, labels[:, 1:][keep[:, :-1]]


def outputs_at(module, batch: dict, keep, packing: bool):
    """(outputs, head): the model's outputs at the ``keep`` positions in row-major order, and the head where those
    are the final hidden states with the head not yet applied (``kernels/head_loss.py``), None where they are logits."""
    import torch

    if not packing:
        return module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[keep], None
    from .kernels.packed_attention import packed_rows

    # The head and the loss run together on slices of the final hidden states, never holding the full positions x
    # vocabulary logits, wherever the head is a plain linear layer.
    head = head_of(module)
    fused = type(head) is torch.nn.Linear and head.bias is None
    with packed_rows(module), hidden_instead_of_logits(head) if fused else contextlib.nullcontext():
        # each example's attention block alone, not the whole row's
        out = module(input_ids=batch["input_ids"], attention_mask=None, position_ids=batch["position_ids"],
                     use_cache=False, logits_to_keep=keep)
    return out.logits.reshape(-1, out.logits.shape[-1]), (head if fused else None)


def loss_sum(module, batch: dict, packing: bool, distill: float = 0.0):
    """Sum of the token losses over the batch's loss tokens (and how many there are): next-token cross-entropy,
    and where the batch carries teacher targets and ``distill`` > 0, (1 - w) x that + w x the cross-entropy
    against the teacher's top-k distribution (renormalised over its k tokens), w = ``distill`` x the position's
    teacher weight (``collate``: train.distill on synthetic items, train.replay_kl on replay); plus, where the batch
    carries teacher hidden states, their weighted ``hidden_loss``. Where the batch carries ``label_weights``
    (train.fact_weight), each position's loss is multiplied by its label's weight."""
    import torch
    import torch.nn.functional as F

    keep, targets = loss_positions(batch["labels"])
    scale = batch["label_weights"][:, 1:][keep[:, :-1]] if "label_weights" in batch else None
    teacher = batch.get("teacher") if distill > 0 else None
    hidden = batch.get("hidden")
    with block_outputs(module, hidden is not None) as states:
        logits, head = outputs_at(module, batch, keep, packing)
    matched = hidden_loss(torch.stack([h[keep] for h in states], dim=1), *hidden) if hidden is not None else 0.0
    if head is not None:
        return fused_head_loss(logits, head.weight, targets, teacher, distill, scale) + matched, int(targets.numel())
    if teacher is None:
        per_position = F.cross_entropy(logits.float(), targets, reduction="none")
    else:
        t_ids, t_lp, has = teacher
        w = distill * has.float()
        logp = torch.log_softmax(logits.float(), dim=-1)
        hard = -logp.gather(1, targets[:, None])[:, 0]
        soft = -(torch.softmax(t_lp, dim=-1) * logp.gather(1, t_ids)).sum(-1)
        per_position = (1 - w) * hard + w * soft
    if scale is not None:
        per_position = per_position * scale
    return per_position.sum() + matched, int(targets.numel())


def hidden_loss(student, teacher, weight):
    """Sum over positions of ``weight`` x the L1 distance of the student's block outputs from the teacher's,
    relative to the teacher's mean magnitude in each block (blocks' scales differ by orders of magnitude), averaged
    over the blocks. ``student`` and ``teacher``: (positions, blocks, hidden size)."""
    t = teacher.float()
    rel = (student.float() - t).abs().mean(-1) / t.abs().mean(-1).clamp_min(1e-6)
    return (weight * rel.mean(-1)).sum()

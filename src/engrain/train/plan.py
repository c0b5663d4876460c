"""What a run will do before it does it: the examples, the split, replay, steps and tokens (``make_plan``), and
the ``--dry-run`` report of steps, time and memory from them."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from ..config import TrainConfig
from ..errors import EngrainError
from ..models import LM
from ..progress import note
from ..workspace import Workspace
from .data import (
    IGNORE,
    Example,
    encode_item,
    item_shas,
    read_synthetic,
    split_examples,
)
from .packing import (
    collate,
    epoch_rows,
    loss_sum,
    steps_per_epoch,
)
from .replay import replay_examples


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
    sources: set[str] = field(default_factory=set)  # content hashes of the chunks the synthetic items come from

    def summary(self) -> dict:
        return {"examples": len(self.train), "synthetic": self.n_synth, "replay": self.n_replay,
                "validation": len(self.val), "steps": self.steps, "steps_per_epoch": self.steps_per_epoch,
                "rows_per_step": self.rows_per_step, "tokens_per_epoch": self.train_tokens_per_epoch,
                "loss_tokens_per_epoch": self.loss_tokens_per_epoch, "truncated_examples": self.truncated,
                **self.extra}


def make_plan(ws: Workspace, lm: LM, cfg: TrainConfig, world: int, packing: bool, *, teacher: bool = True,
              show: bool = True, items: list[tuple[str, dict]] | None = None) -> Plan:
    """The run's data and size: ``items`` (key, item), every synthetic item of the workspace when None. With
    ``cfg.distill`` or ``cfg.distill_hidden`` > 0 and ``teacher``, the training examples get their teacher targets
    (computed with ``lm`` before any memory is attached, or read from the workspace's cache)."""
    items = read_synthetic(ws) if items is None else items
    examples = [encode_item(lm.tokenizer, item, key, end_loss=cfg.item_end_loss, fact_weight=cfg.fact_weight)
                for key, item in items]
    train, val = split_examples(examples, dict(items), cfg.val_fraction, cfg.val_max)
    extra = {}
    if cfg.distill > 0 or cfg.distill_hidden > 0:
        with_chunks = sum(1 for key, item in items if item.get("chunk_ids"))
        extra["distill"] = {"weight": cfg.distill, "hidden_weight": cfg.distill_hidden, "top_k": cfg.distill_top_k,
                            "items_with_chunks": with_chunks}
        if teacher:
            from .distill import teacher_targets

            targets = teacher_targets(ws, lm, train, dict(items), cfg.distill_top_k, IGNORE, show,
                                      hidden=cfg.distill_hidden > 0)
            for ex in train:
                ex.teacher, ex.teacher_weight, ex.hidden_weight = targets.get(ex.key), cfg.distill, cfg.distill_hidden
            extra["distill"]["examples_with_teacher"] = len(targets)
    replay = replay_examples(ws, lm, cfg, len(train))
    if replay and cfg.replay_kl > 0 and teacher:
        from .distill import self_targets
        from .precision import use_bf16

        bf16 = use_bf16(cfg.bf16, str(next(lm.model.parameters()).device))
        for ex, target in zip(replay, self_targets(lm, replay, cfg.distill_top_k, IGNORE, bf16, show)):
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
                truncated=sum(1 for e in train if len(e.ids) > cfg.seq_len), extra=extra,
                sources={sha for _, item in items for sha in item_shas(item)})


def steps_within(budget_s: float, seconds: float, done: int, planned: int) -> int:
    """The steps a run fits into ``budget_s`` seconds of training at the pace of its first ``done`` steps (which took
    ``seconds``, evaluations included): never more than ``planned``, never fewer than ``done``."""
    if done <= 0 or seconds <= 0:
        return planned
    return max(done, min(planned, int(budget_s * done / seconds)))


# Steps timed before train.max_minutes cuts a plan: the first steps carry one-off costs (allocation, warm caches).
BUDGET_TIMED_STEPS = 8


def dry_run_report(ws: Workspace, lm: LM, kind, cfg: TrainConfig, plan: Plan, lr: float, packing: bool,
                   device) -> dict:
    """Steps, tokens, time measured on a few real micro-steps, and predicted peak memory against available RAM."""
    import resource

    import psutil

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
    if cfg.max_minutes is not None and report["estimated_seconds"]:  # what train.max_minutes would leave
        timed = min(plan.steps, BUDGET_TIMED_STEPS)  # the run judges after these, at this measured pace
        report["steps_within_max_minutes"] = steps_within(cfg.max_minutes * 60,
                                                           report["estimated_seconds"] * timed / plan.steps,
                                                           timed, plan.steps)
    if report["oom_risk"]:
        note(f"engrain: WARNING: predicted peak memory {report['predicted_peak_memory_mb']} MB exceeds the "
             f"{report['available_memory_mb']} MB available: out-of-memory risk. Lower train.micro_batch or "
             "train.seq_len, or use lora instead of full.")
    return report

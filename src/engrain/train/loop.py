"""One training loop for every parametric memory (lora, full, prefix, memory layer), top to bottom.

AdamW, cosine schedule with warm-up, gradient accumulation, clipping, optional bf16 autocast, ``accelerate`` for DDP
(a no-op in one process). The loss of a step is the sum of token losses over the whole global batch divided by its
number of loss tokens, so any split of a global batch over micro-batches and processes gives the same gradient.
The data comes from ``data.py`` and ``replay.py``, is packed by ``packing.py``, judged by ``validation.py`` and
saved by ``checkpoints.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field

from ..config import TrainConfig
from ..errors import EngrainError
from ..models import LM
from ..progress import Progress, note
from ..workspace import Workspace
from .checkpoints import (
    checkpoints,
    config_diff,
    load_checkpoint,
    run_dir,
    save_checkpoint,
    save_memory,
)
from .data import IGNORE, Example, encode_item, read_synthetic, split_examples
from .packing import (
    collate,
    epoch_rows,
    global_batches,
    loss_sum,
    pack,
    steps_per_epoch,
    unpacked_rows,
)
from .replay import replay_examples
from .validation import answered_share, evaluate_loss


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


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
    from ..models import bf16_supported

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

    from ..memory.parametric import (
        META_FILE,
        get_kind,
        model_fingerprint,
        trainable_state,
    )
    from ..models import load_model

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
                note(f"engrain: {out_dir} is already trained with this config; nothing to do (--force to retrain)")
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
            note(f"engrain: resuming '{name}' from step {start_step} ({resume_from})")

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
    if report["oom_risk"]:
        note(f"engrain: WARNING: predicted peak memory {report['predicted_peak_memory_mb']} MB exceeds the "
             f"{report['available_memory_mb']} MB available: out-of-memory risk. Lower train.micro_batch or "
             "train.seq_len, or use lora instead of full.")
    return report

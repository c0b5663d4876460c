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
from dataclasses import dataclass

from ..config import TrainConfig
from ..errors import EngrainError
from ..evaluate.metrics import mcnemar_p
from ..models import LM
from ..progress import Progress, note
from ..workspace import Workspace
from .checkpoints import (
    checkpoints,
    config_diff,
    load_checkpoint,
    recover_memory,
    run_dir,
    save_checkpoint,
    save_memory,
)
from .packing import (
    collate,
    global_batches,
    loss_sum,
)
from .averaging import WeightAverage
from .null_space import general_projections, lora_layers, project_, projected_weights
from .precision import bf16_autocast, use_bf16
from .validation import evaluate
from .plan import BUDGET_TIMED_STEPS, Plan, dry_run_report, make_plan, steps_within
from .replay import DEFAULT_SOURCES


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# Beside a checkpoint's trained weights: the best evaluation's weights (keep_best) and the moving average
# (train.ema_horizon), written inside the checkpoint's folder before its rename.
BEST_FILE, AVERAGE_FILE = "best.safetensors", "average.safetensors"

# Settings only `engrain update` reads: they change nothing `engrain train` computes, so a memory trained before
# they existed, or with other values, is still the same training run.
UPDATE_KEYS = ("update_epochs", "update_rehearsal")


def run_config(cfg: TrainConfig, lm: LM) -> dict:
    """The settings a resume must match: the train section plus the base model."""
    return {**{k: v for k, v in cfg.model_dump().items() if k not in UPDATE_KEYS}, "base_model": lm.name}


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system at once.

    By default glibc gives blocks above 32 MB to the system on free (and trims its heap when the top stays free),
    so a training step, which frees and allocates the same 50 MB head slices and activations again and again, pays
    page faults and the kernel's zeroing for every one (``python bench/bench_step_parts.py lora 3 --glibc-default``
    against the same without the flag measures it). The cost: up to 1 GB of freed memory stays with the process. Returns whether the setting took (glibc only)."""
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


def with_kind_defaults(cfg: TrainConfig, kind) -> TrainConfig:
    """``cfg`` with what it leaves to the memory kind filled in: rows packed to the kind's ``default_pack_tokens``
    where ``train.pack_tokens`` is unset (fewer tokens per row, more updates for the same tokens), and replay from
    the kind's ``default_replay_sources`` (the base model's chat answers alone without it) where
    ``train.replay_sources`` is unset."""
    update: dict = {}
    rows = getattr(kind, "default_pack_tokens", None)
    if cfg.pack_tokens is None and rows:
        update["pack_tokens"] = min(rows, cfg.seq_len)
    if cfg.replay_sources is None:
        update["replay_sources"] = list(getattr(kind, "default_replay_sources", DEFAULT_SOURCES))
    return cfg.model_copy(update=update) if update else cfg


def train(ws: Workspace, cfg: TrainConfig, model_spec: str | None = None, *, name: str | None = None,
          force: bool = False, dry_run: bool = False, show_progress: bool = True, lm: LM | None = None) -> dict:
    """Train ``cfg.memory`` on the workspace's synthetic data; returns the run's summary (also in the memory's
    ``engrain_memory.json``). Resumes from the last checkpoint of an interrupted run with the same config."""
    import torch
    from accelerate import Accelerator

    from ..memory.parametric import get_kind
    from ..models import load_model

    kind = get_kind(cfg.memory)
    cfg = with_kind_defaults(cfg, kind)
    name = name or cfg.name or kind.name  # the kind's current name, even when cfg names it by an old one
    keep_freed_memory()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    show = show_progress and accelerator.is_main_process
    packing = bool(getattr(kind, "packing", True)) and cfg.packing

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    lm = lm or load_model(model_spec, device=str(accelerator.device), dtype="float32")
    runcfg = run_config(cfg, lm)
    if not dry_run and not force and (done := already_trained(ws.memory_dir(name), runcfg, show)) is not None:
        return done

    with accelerator.main_process_first():  # replay data is generated and cached once, by the main process
        plan = make_plan(ws, lm, cfg, accelerator.num_processes, packing, teacher=not dry_run, show=show)
    lr = cfg.lr if cfg.lr is not None else float(getattr(kind, "default_lr", 1e-4))
    if dry_run:
        return dry_run_report(ws, lm, kind, cfg, plan, lr, packing, accelerator.device)

    recover_memory(ws, name)
    resume_from = resume_point(ws, name, runcfg, force, accelerator)
    run = Run(ws, name, kind, cfg, lm, plan, runcfg, accelerator, packing, lr, show)
    if resume_from is not None:
        run.resume(resume_from)
    run.loop()
    return run.finish()


def already_trained(out_dir, runcfg: dict, show: bool) -> dict | None:
    """A finished memory with the same config is not trained twice (its summary is returned); with another config
    only under --force."""
    from ..memory.parametric import META_FILE

    if not (out_dir / META_FILE).is_file():
        return None
    meta = json.loads((out_dir / META_FILE).read_text())
    diff = config_diff(meta.get("config", {}), runcfg)
    if diff:
        raise EngrainError(f"{out_dir} was trained with another config:\n  " + "\n  ".join(diff),
                           hint="Train it again with the new config (the old one is replaced): --force with "
                                "`engrain train`, --rebuild with `engrain compare` or `engrain demo`. Or set "
                                "those settings back in engrain.yaml to keep it.")
    if show:
        note(f"engrain: {out_dir} is already trained with this config; nothing to do (--force to retrain)")
    return {**meta, "already_trained": True}


def resume_point(ws: Workspace, name: str, runcfg: dict, force: bool, accelerator):
    """The last checkpoint of an interrupted run with the same config, or None. Checkpoints of another config are
    refused unless forced, and then discarded."""
    ckpts = checkpoints(ws, name)
    if not ckpts:
        return None
    state = json.loads((ckpts[-1] / "state.json").read_text())
    diff = config_diff(state.get("config", {}), runcfg)
    if not diff:
        return ckpts[-1]
    if not force:
        raise EngrainError(f"An interrupted run of '{name}' (step {state['step']}) used another config:\n  "
                           + "\n  ".join(diff),
                           hint="Run with the same settings to resume it, or pass --force to start over.")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(run_dir(ws, name) / "checkpoints", ignore_errors=True)
    accelerator.wait_for_everyone()
    return None


def lead(best: list[bool] | None, last: list[bool] | None) -> tuple[int, int] | None:
    """(questions answered by ``best`` alone, by ``last`` alone): two evaluations' answers to the same held-out
    questions, or None when they cannot be compared."""
    if best is None or last is None or len(best) != len(last):
        return None
    return sum(b and not a for b, a in zip(best, last)), sum(a and not b for b, a in zip(best, last))


def beyond_noise(split: tuple[int, int] | None, p: float | None) -> bool:
    """Whether an earlier evaluation's lead over the last (``lead``'s split) is larger than the noise of counting a
    few held-out questions: more answered by it alone, at McNemar's exact p at or below ``p``. With ``p`` None, or
    answers that cannot be compared, any better score counts, as the evaluations were judged."""
    if p is None or split is None:
        return True
    won, lost = split
    return won > lost and mcnemar_p(won, lost) <= p


@dataclass
class Best:
    """The best evaluation so far, judged by (held-out facts answered, -validation loss): higher is better."""

    val: float | None = None
    step: int | None = None
    score: tuple | None = None
    bad_evals: int = 0
    weights: dict | None = None  # the trainable weights of that evaluation, when cfg.keep_best
    answers: list[bool] | None = None  # its answer to each held-out question

    def judge(self, step: int, val: float, answers: list[bool] | None, weights) -> None:
        """Record an evaluation; ``weights()`` is called only when it is the best so far."""
        score = (sum(answers) / len(answers) if answers else 0.0, -round(val, 6))
        if self.score is None or score > self.score:
            self.val, self.step, self.score, self.bad_evals, self.answers = val, step, score, 0, answers
            self.weights = weights()
        else:
            self.bad_evals += 1


class Run:
    """One training run's state, from the attached module to the saved memory, in the order ``train`` calls it."""

    def __init__(self, ws: Workspace, name: str, kind, cfg: TrainConfig, lm: LM, plan: Plan, runcfg: dict,
                 accelerator, packing: bool, lr: float, show: bool) -> None:
        import torch

        self.ws, self.name, self.kind, self.cfg, self.lm, self.plan = ws, name, kind, cfg, lm, plan
        self.runcfg, self.accelerator, self.packing, self.lr, self.show = runcfg, accelerator, packing, lr, show
        self.device = accelerator.device
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        settings = cfg.model_dump()
        self.module = kind.attach(lm.model, lm.tokenizer, settings, ws)
        self.module.train()
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if hasattr(kind, "make_optimizer"):
            self.optimizer = kind.make_optimizer(self.module, lr, cfg.weight_decay)
        else:
            groups = kind.param_groups(self.module, lr, settings) if hasattr(kind, "param_groups") else self.params
            self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * plan.steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup, plan.steps, cfg.min_lr_ratio))
        self.best = Best()
        self.last_answers: list[bool] | None = None  # of the latest evaluation, which at the end is the last step
        # The moving average spans a share of the planned steps, so one setting means the same on any corpus.
        self.average = WeightAverage(self.module, cfg.ema_horizon * plan.steps) if cfg.ema_horizon > 0 else None
        self.step = self.start_step = 0
        self.planned_steps = plan.steps  # before train.max_minutes cuts plan.steps (and the decay with it)
        self.resumed = False
        self.history: list[dict] = []
        # Training time and tokens of the runs before a resume (up to their last checkpoint), so the summary's
        # train_seconds is the build time of the whole memory, not of its last stretch.
        self.seconds_before, self.tokens_before = 0.0, 0
        self.tokens_seen, self.last_loss, self.stopped_early = 0, float("nan"), False
        self.bf16 = use_bf16(cfg.bf16, str(self.device))
        self.null_space = self.null_space_projections()

    def null_space_projections(self) -> list[tuple] | None:
        """``train.lora_null_share``'s (A weight, projection) pairs, from the replay, before any step (None when
        off); the adapter starts inside them. A resumed run computes the same ones: the replay and the base weights
        are the same."""
        share = self.cfg.lora_null_share
        if share <= 0:
            return None
        if not lora_layers(self.module):
            raise EngrainError(f"train.lora_null_share applies to LoRA, not to the '{self.kind.name}' memory.",
                               hint="Set it back to 0, or train --memory lora.")
        replay = [ex.ids for ex in self.plan.train if ex.kind == "replay"]
        if not replay:
            raise EngrainError("train.lora_null_share needs replay examples to find the general inputs.",
                               hint="Set train.replay_share above 0, or lora_null_share back to 0.")
        documents = [ex.ids for ex in self.plan.train if ex.kind != "replay"] if self.cfg.lora_null_relative else None
        t0 = time.time()
        pairs = projected_weights(self.module, general_projections(self.module, replay, share, self.device,
                                                                   self.bf16, documents=documents))
        project_(pairs)
        if self.show:
            note(f"engrain: LoRA kept out of {share:.0%} of each layer's input directions "
                 f"({len(pairs)} layers, found in {time.time() - t0:.0f} s)")
        return pairs

    def resume(self, folder) -> None:
        state = load_checkpoint(folder, self.module, self.optimizer, self.scheduler)
        self.step = self.start_step = state["step"]
        self.resumed = True
        self.best = Best(state.get("best_val"), state.get("best_step"),
                         tuple(state["best_score"]) if state.get("best_score") else None, state.get("bad_evals", 0),
                         answers=state.get("best_answers"))
        self.history = state.get("history", [])
        self.plan.steps = state.get("plan_steps", self.plan.steps)  # as train.max_minutes had cut it
        self.seconds_before, self.tokens_before = state.get("train_seconds", 0.0), state.get("train_tokens", 0)
        from safetensors.torch import load_file

        if (folder / BEST_FILE).is_file():
            self.best.weights = load_file(str(folder / BEST_FILE))
        if self.average is not None:  # one update per step; a config with the average always saved it
            self.average.load(load_file(str(folder / AVERAGE_FILE)), self.start_step)
        if self.show:
            note(f"engrain: resuming '{self.name}' from step {self.start_step} ({folder})")

    def loop(self) -> None:
        """Optimizer steps until the plan's end or early stopping, evaluating, logging and checkpointing."""
        cfg, plan = self.cfg, self.plan
        self.model = self.accelerator.prepare(self.module)  # DDP under `accelerate launch`; the module otherwise
        stream = global_batches(plan.train, cfg, plan.rows_per_step, self.packing)
        eval_every = cfg.eval_every or max(1, plan.steps_per_epoch // 4)
        for _ in range(self.start_step):  # the same data order as an uninterrupted run
            next(stream)
        self.t_start = time.time()
        with Progress(self.show, plan.steps, self.start_step, f"train {self.name}") as progress:
            while self.step < plan.steps:
                epoch, batch = next(stream)
                record = self.optimizer_step(epoch, batch)
                if cfg.max_minutes is not None:
                    self.fit_budget(progress)
                if (self.step % eval_every == 0 or self.step == plan.steps) and plan.val:
                    self.evaluate(record)
                self.log(record, progress)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < plan.steps \
                        and not self.stopped_early:
                    self.checkpoint()
                if self.stopped_early:
                    break

    def optimizer_step(self, epoch: int, batch: list) -> dict:
        """One step over a global batch: every process takes every world-th micro-batch; returns the log record."""
        import torch

        accelerator, model = self.accelerator, self.model
        n_loss = sum(r.n_loss for r in batch)  # known to every process: the data stream is shared
        micro = [batch[i:i + self.cfg.micro_batch] for i in range(0, len(batch), self.cfg.micro_batch)]
        mine = micro[self.rank::self.world]
        step_loss = 0.0
        for j, rows in enumerate(mine):
            tensors = collate(rows, self.lm.tokenizer.pad_token_id, self.packing, self.device)
            ctx = accelerator.no_sync(model) if j < len(mine) - 1 else contextlib.nullcontext()
            with ctx, bf16_autocast(str(self.device), self.bf16):
                s, _ = loss_sum(model, tensors, self.packing, 1.0)  # each position's teacher weight is in the batch
                # DDP averages gradients over processes; scaling by world turns that into the global sum.
                loss = s * self.world / max(1, n_loss)
            loss.backward()
            step_loss += float(s.detach())
            self.tokens_seen += sum(len(r.ids) for r in rows)
        hook = getattr(self.kind, "sparse_grad_hook", None)
        if hook is not None:
            hook(accelerator.unwrap_model(model))
        if self.cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        if self.null_space is not None:
            project_(self.null_space)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.average is not None:
            self.average.update()
        self.step += 1
        # Loss of the whole global batch (summed over processes) for logging.
        step_loss_t = accelerator.reduce(torch.tensor([step_loss], device=self.device), reduction="sum")
        self.last_loss = float(step_loss_t[0]) / max(1, n_loss)
        elapsed = time.time() - self.t_start
        return {"step": self.step, "epoch": epoch, "loss": round(self.last_loss, 5),
                "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": round(self.tokens_per_s(elapsed), 1),
                "seconds": round(self.seconds_before + elapsed, 1)}

    def fit_budget(self, progress: Progress) -> None:
        """train.max_minutes: the plan's steps cut to what fits at the pace so far, re-judged after every step (the
        pace includes evaluations, and a host's speed drifts); the cosine decay reads plan.steps, so it ends with
        the cut plan instead of being stopped halfway down."""
        if self.step - self.start_step < BUDGET_TIMED_STEPS:
            return
        seconds = self.seconds_before + time.time() - self.t_start
        if self.world > 1:  # every process must cut at the same step: they judge by the slowest one's clock
            import torch

            seconds = float(self.accelerator.reduce(torch.tensor([seconds], device=self.device), reduction="max")[0])
        steps = steps_within(self.cfg.max_minutes * 60, seconds, self.step, self.planned_steps)
        if steps != self.plan.steps:
            if self.show and self.plan.steps == self.planned_steps:  # said once, when the plan is first cut
                note(f"engrain: train.max_minutes ({self.cfg.max_minutes:g}): at this pace {steps} of the "
                     f"{self.planned_steps} planned steps fit; the learning rate decays to its floor by then")
            self.plan.steps = steps
            progress.set_total(steps)

    def tokens_per_s(self, elapsed: float) -> float:
        return self.tokens_seen * self.world / max(1e-9, elapsed)

    def evaluate(self, record: dict) -> None:
        """Validation loss and held-out facts answered; the best evaluation's weights are kept (``keep_best``)."""
        from ..memory.parametric import trainable_state

        inner = self.accelerator.unwrap_model(self.model)
        # With a moving average, the average is what is judged and what keep_best keeps.
        averaged = self.average.swapped_in() if self.average is not None else contextlib.nullcontext()
        with averaged:
            with bf16_autocast(str(self.device), self.bf16):  # in the precision the run trains in
                val, answers = evaluate(inner, self.plan.val, self.lm.tokenizer, micro_batch=self.cfg.micro_batch,
                                        seq_len=self.cfg.seq_len, packing=self.packing, device=self.device)
            record["val_loss"] = round(val, 5)
            if answers is not None:
                record["val_answered"] = round(sum(answers) / len(answers), 4)
            self.last_answers = answers
            keep = self.cfg.keep_best
            self.best.judge(self.step, val, answers,
                            lambda: {k: v.clone() for k, v in trainable_state(inner).items()} if keep else None)
        patience = self.cfg.early_stopping_patience
        if patience and self.best.bad_evals >= patience:
            self.stopped_early = True

    def log(self, record: dict, progress: Progress) -> None:
        self.history.append(record)
        if self.accelerator.is_main_process:
            log_path = run_dir(self.ws, self.name) / "log.jsonl"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        val = record.get("val_loss")
        progress.update(self.step, f"loss {self.last_loss:.3f} · {record['tokens_per_s']:,.0f} tok/s"
                        + (f" · val {val:.3f}" if val is not None else ""))

    def checkpoint(self) -> None:
        """Everything a resume needs, written atomically by the main process."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            best = self.best
            state = {"config": self.runcfg, "plan_steps": self.plan.steps, "best_val": best.val,
                     "best_step": best.step, "bad_evals": best.bad_evals,
                     "best_score": list(best.score) if best.score else None, "best_answers": best.answers,
                     "history": self.history[-1000:],
                     "train_seconds": self.seconds_before + time.time() - self.t_start,
                     "train_tokens": self.tokens_before + self.tokens_seen * self.world}
            extra = {}
            if best.weights is not None:
                extra[BEST_FILE] = best.weights
            if self.average is not None:
                extra[AVERAGE_FILE] = self.average.state()
            save_checkpoint(self.ws, self.name, self.step, self.accelerator.unwrap_model(self.model),
                            self.optimizer, self.scheduler, state, self.cfg.keep_checkpoints, extra)
        self.accelerator.wait_for_everyone()

    def finish(self, meta: dict | None = None) -> dict:
        """The kept weights (the best evaluation's, with keep_best) saved as the memory; returns the summary.
        ``meta`` (from ``engrain update``) is laid over the summary before it is saved."""
        import torch

        from ..memory.parametric import model_fingerprint
        from .data import learned_documents

        seconds = time.time() - self.t_start
        module = self.accelerator.unwrap_model(self.model)
        best, cfg, lm = self.best, self.cfg, self.lm
        # The last evaluation is of the last step; an earlier one replaces it only on a lead beyond keep_best_p.
        split = lead(best.answers, self.last_answers)
        kept_best = cfg.keep_best and best.weights is not None and beyond_noise(split, cfg.keep_best_p)
        if kept_best:
            with torch.no_grad():
                named = dict(module.named_parameters())
                for k, v in best.weights.items():
                    named[k].copy_(v)
        elif self.average is not None:
            self.average.copy_into_params()
        summary = {"memory": self.name, "kind": self.kind.name, "base_model": lm.name, "base_model_path": lm.path,
                   "base_fingerprint": model_fingerprint(lm.model),
                   "steps": self.step, "planned_steps": self.planned_steps, "stopped_early": self.stopped_early,
                   "cut_by_max_minutes": self.plan.steps < self.planned_steps,
                   "resumed_from_step": self.start_step if self.resumed else None, "learning_rate": self.lr,
                   "train_seconds": round(self.seconds_before + seconds, 2),
                   "resumed_seconds": round(self.seconds_before, 2),  # trained before a resume, by another process
                   "train_tokens": self.tokens_before + self.tokens_seen * self.world,
                   "tokens_per_s": round(self.tokens_per_s(seconds), 1),
                   "final_train_loss": round(self.last_loss, 5), "best_val_loss": best.val, "best_val_step": best.step,
                   "best_val_answered": best.score[0] if best.score else None,
                   "best_over_last": list(split) if split else None,  # held-out questions answered by one alone
                   "kept_weights_of_step": best.step if kept_best else self.step,
                   "trainable_params": sum(p.numel() for p in self.params), "processes": self.world,
                   "bf16": self.bf16, "packing": self.packing, "data": self.plan.summary(), "config": self.runcfg,
                   "out": str(self.ws.memory_dir(self.name)),
                   # What `engrain update` compares with the corpus to find new, changed and removed documents.
                   "learned_documents": learned_documents(self.ws, self.plan.sources),
                   **(meta or {})}
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_memory(self.ws, self.name, self.kind, module, summary)
            shutil.rmtree(run_dir(self.ws, self.name) / "checkpoints", ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return summary



"""``engrain update``: a trained memory taught the documents added or changed since it was trained, without a rebuild.

A memory's meta records the documents it learned (``learned_documents``: id -> content hash); against the corpus that
says what is new, changed and removed. An update then

1. synthesises what is missing (synthesis is resumable by chunk hash, so only new and changed chunks are made);
2. trains the memory further from its saved weights on the items of the new and changed documents, mixed with a
   sample of the items of the documents it already learned (``train.update_rehearsal``) and the usual general
   replay, for ``train.update_epochs`` passes, with the memory's own recipe (rank, learning rate, ...);
3. saves it as training does: checkpoints in ``WS/train/<name>/`` that a rerun resumes, and the new memory written
   to a temporary folder and renamed over the old one, which stays usable until then.

Removed documents are reported, never unlearned: their facts stay in the weights, but their items (made from chunks
the corpus no longer has) are not rehearsed again.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..atomic import write_json
from ..config import EngrainConfig, TrainConfig
from ..errors import EngrainError
from ..models import LM
from ..progress import note
from ..workspace import Workspace
from .checkpoints import OPERATIONAL_KEYS, recover_memory
from .data import item_shas, learned_documents, read_synthetic

# Kinds whose training can start from a saved memory: LoRA (the adapter loaded as trainable), full (the saved
# weights loaded into the model), and the prefix and memory layer (memory/continued.py: their saved tensors put
# back in place of the freshly attached ones; the memory layer's slot choice then avoids what earlier documents read).
UPDATABLE = ("lora", "full", "prefix", "memory_layer")
REMOVED_NOTE = "removed, facts not unlearned"
# What of the previous meta the new one keeps under ``previous``: its history, without the bulky run details.
HISTORY_KEYS = ("steps", "train_seconds", "learned_documents", "removed_documents", "update", "previous")


@dataclass
class Changes:
    """The corpus's documents against what a memory learned, each as id -> content hash."""

    new: dict[str, str]
    changed: dict[str, str]
    removed: dict[str, str]  # the hash the memory learned
    unchanged: dict[str, str]

    @property
    def fresh(self) -> dict[str, str]:
        """The documents to learn: new and changed."""
        return {**self.new, **self.changed}

    def to_dict(self) -> dict:
        return {"new": sorted(self.new), "changed": sorted(self.changed), "removed": sorted(self.removed),
                "removed_note": REMOVED_NOTE if self.removed else None, "unchanged": len(self.unchanged)}


def corpus_changes(ws: Workspace, learned: dict[str, str]) -> Changes:
    """What the corpus holds now against ``learned`` (a memory's ``learned_documents``)."""
    from ..corpus.schema import read_documents

    docs = {d.id: d.sha256 for d in read_documents(ws)}
    return Changes(new={i: h for i, h in docs.items() if i not in learned},
                   changed={i: h for i, h in docs.items() if i in learned and learned[i] != h},
                   removed={i: h for i, h in learned.items() if i not in docs},
                   unchanged={i: h for i, h in docs.items() if learned.get(i) == h})


def split_items(ws: Workspace, fresh: set[str]) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]], int]:
    """(items of the ``fresh`` documents, items of the others, stale items). An item is stale when a chunk it was
    made from is no longer in the corpus: a removed document's, or an older version of a changed one. Items written
    by hand (no chunk hashes) belong to no document and count as earlier items."""
    from ..corpus.schema import read_chunks

    docs_of: dict[str, set[str]] = {}
    for chunk in read_chunks(ws):
        docs_of.setdefault(chunk.sha256, set()).add(chunk.doc_id)
    new, earlier, stale = [], [], 0
    for key, item in read_synthetic(ws):
        shas = item_shas(item)
        if any(s not in docs_of for s in shas):
            stale += 1
        elif any(docs_of[s] & fresh for s in shas):
            new.append((key, item))
        else:
            earlier.append((key, item))
    return new, earlier, stale


def rehearsal_sample(earlier: list, n_new: int, share: float, seed: int) -> list:
    """A seeded sample of ``earlier`` items making ``share`` of the mix with ``n_new`` new items (fewer when there
    are not that many), in file order so a rerun builds the same plan."""
    want = min(len(earlier), round(n_new * share / (1.0 - share)))
    picked = sorted(random.Random(seed).sample(range(len(earlier)), want))
    return [earlier[i] for i in picked]


def previous_meta(ws: Workspace, name: str) -> dict:
    """The meta of the memory to update; EngrainError saying what to do when it cannot be updated."""
    from ..memory.parametric import META_FILE, get_kind, read_meta

    folder = ws.memory_dir(name)
    if not (folder / META_FILE).is_file():
        raise EngrainError(f"No trained memory '{name}' in {folder}: there is nothing to update.",
                           hint=f"Train it first: engrain train -w {ws.root} --memory {name}")
    meta = read_meta(folder)
    kind = get_kind(meta.get("kind", name)).name
    if kind not in UPDATABLE:
        raise EngrainError(f"engrain update is implemented for {' and '.join(UPDATABLE)} memories; '{name}' is a "
                           f"{kind} memory.",
                           hint=f"Train it again on the whole corpus: engrain train -w {ws.root} --memory {kind}"
                                + (f" --name {name}" if name != kind else "") + " --force")
    if not isinstance(meta.get("learned_documents"), dict):
        raise EngrainError(f"The memory in {folder} was trained before engrain recorded the documents a memory "
                           "learned, so an update cannot tell what is new.",
                           hint=f"Train it again once: engrain train -w {ws.root} --memory {kind}"
                                + (f" --name {name}" if name != kind else "") + " --force")
    return meta


def check_model(meta: dict, lm: LM, folder: Path) -> None:
    """An update continues the memory on the model it was trained on, and only there."""
    from ..memory.parametric import check_base

    trained_on = meta.get("base_model")
    if trained_on and trained_on != lm.name:
        raise EngrainError(f"The memory in {folder} was trained on model '{trained_on}', not on '{lm.name}' "
                           "(the model this update would use).",
                           hint=f"Update it with --model {meta.get('base_model_path') or trained_on}, or train a new "
                                "memory for this model with engrain train --name NEW.")
    check_base(lm.model, folder)


def update_config(meta: dict, workspace_cfg: TrainConfig) -> TrainConfig:
    """The memory's own recipe (what it was trained with: its shape must match the saved weights), run for the
    workspace's ``update_epochs``, with the workspace's operational and update settings."""
    recipe = {k: v for k, v in (meta.get("config") or {}).items() if k in TrainConfig.model_fields}
    own = {k: getattr(workspace_cfg, k) for k in (*OPERATIONAL_KEYS, "update_epochs", "update_rehearsal")}
    return TrainConfig.model_validate(recipe).model_copy(
        update={**own, "epochs": workspace_cfg.update_epochs, "max_steps": None})


def load_previous_weights(kind: str, module, folder: Path, *, tokenizer=None, learned_texts: list[str] = ()) -> None:
    """Start from the saved memory: its tensors copied into the freshly attached, trainable module (a memory layer
    also measures which slots ``learned_texts``, the documents learned before, read: see memory/continued.py)."""
    import torch
    from safetensors.torch import load_file

    if kind == "prefix":
        from ..memory.continued import continue_prefix

        continue_prefix(module, folder)
        return
    if kind == "memory_layer":
        from ..memory.continued import continue_memory_layer

        continue_memory_layer(module, folder, tokenizer, list(learned_texts))
        return

    if kind == "lora":
        from peft import set_peft_model_state_dict

        path = folder / "adapter_model.safetensors"
        if not path.is_file():
            raise EngrainError(f"No adapter weights in {folder} (missing {path.name}).", hint="Train the memory again.")
        result = set_peft_model_state_dict(module, load_file(str(path)))
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            raise EngrainError(f"The adapter in {folder} does not fit the LoRA its recipe attaches "
                               f"(unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}).",
                               hint="Train the memory again with --force.")
        return
    state: dict = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    with torch.no_grad():
        missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied output weights are stored once
    if missing or unexpected or not state:
        raise EngrainError(f"The weights in {folder} do not fit the model (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}).", hint="Train the memory again with --force.")


def chunk_texts(ws: Workspace, docs: set[str]) -> list[str]:
    """The text of every chunk of ``docs`` (document ids) in the corpus."""
    from ..corpus.schema import read_chunks

    return [c.text for c in read_chunks(ws) if c.doc_id in docs] if docs else []


def history(meta: dict) -> dict:
    return {k: meta[k] for k in HISTORY_KEYS if k in meta}


def digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def removed_documents(meta: dict, changes: Changes) -> dict[str, str]:
    """Every document the memory once learned that the corpus no longer has (a document added back is new again)."""
    now = {**changes.unchanged, **changes.fresh}
    return {d: h for d, h in {**(meta.get("removed_documents") or {}), **changes.removed}.items() if d not in now}


def update(ws: Workspace, config: EngrainConfig, model_spec: str | None = None, *, name: str | None = None,
           force: bool = False, show_progress: bool = True, lm: LM | None = None,
           exclude_questions: list[Path] | None = None) -> dict:
    """Teach memory ``name`` the corpus's new and changed documents; returns the summary (the new meta, with what
    the update did under ``update``; ``nothing_to_do`` when the corpus did not change). ``exclude_questions``
    (question files) is synthesis's leak guard, as for ``engrain synth --exclude-questions``."""
    name = name or config.train.name or config.train.memory
    folder = ws.memory_dir(name)
    recover_memory(ws, name)
    meta = previous_meta(ws, name)
    changes = corpus_changes(ws, meta["learned_documents"])
    record = {"documents": changes.to_dict(), "updated": datetime.now(UTC).isoformat(timespec="seconds")}
    if not changes.fresh and not changes.removed:
        if show_progress:
            note(f"engrain: '{name}' has learned every document of the corpus; nothing to update")
        return {"memory": name, "out": str(folder), "nothing_to_do": True, "update": record}
    if show_progress:
        note(f"engrain: updating '{name}': {len(changes.new)} new, {len(changes.changed)} changed, "
             f"{len(changes.removed)} removed document(s)" + (f" ({REMOVED_NOTE})" if changes.removed else ""))
    new: list = []
    if changes.fresh:
        from ..models import load_model
        from ..synth.run import run_synth

        lm = lm or load_model(model_spec, dtype="float32")
        check_model(meta, lm, folder)
        record["synth"] = {k: {"chunks_run": r["chunks_run"], "accepted": r["accepted"]}
                           for k, r in run_synth(ws, config.synth, model_spec=model_spec,
                                                 exclude_questions=exclude_questions,
                                                 show_progress=show_progress)["strategies"].items()}
        new, earlier, stale = split_items(ws, set(changes.fresh))
        record["items"] = {"new": len(new), "earlier": len(earlier), "stale": stale}
    overlay = {"previous": history(meta), "removed_documents": removed_documents(meta, changes), "update": record}
    if not new:  # only removals, or new documents with nothing to ask: no training, the meta says what changed
        learned = {**changes.unchanged, **{d: h for d, h in learned_documents(ws, set()).items() if d in changes.fresh}}
        summary = {**meta, **overlay, "learned_documents": learned}
        from ..memory.parametric import META_FILE

        write_json(folder / META_FILE, summary)  # atomic: a temporary file renamed over the old meta
        return summary
    return train_update(ws, name, meta, config.train, lm, changes, new, earlier, overlay, force, show_progress)


def train_update(ws: Workspace, name: str, meta: dict, workspace_cfg: TrainConfig, lm: LM, changes: Changes,
                 new: list, earlier: list, overlay: dict, force: bool, show: bool) -> dict:
    """Train the memory further on ``new`` items with rehearsal of ``earlier`` ones, resumably; save it atomically."""
    import torch
    from accelerate import Accelerator

    from ..memory.parametric import get_kind
    from .loop import Run, keep_freed_memory, resume_point, run_config, with_kind_defaults
    from .plan import make_plan

    kind = get_kind(meta.get("kind", name))
    cfg = with_kind_defaults(update_config(meta, workspace_cfg), kind)
    keep_freed_memory()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    packing = bool(getattr(kind, "packing", True)) and cfg.packing
    rehearsed = rehearsal_sample(earlier, len(new), cfg.update_rehearsal, cfg.seed)
    record = overlay["update"]
    record["items"].update(rehearsed=len(rehearsed))
    record.update(epochs=cfg.update_epochs, rehearsal_share=cfg.update_rehearsal)
    # What a resume must match: the recipe, the memory it started from and what it learns. A corpus changed since
    # an interrupted update makes another run, refused unless --force (as for training).
    runcfg = {**run_config(cfg, lm), "update": {
        "from_steps": meta.get("steps"), "from_documents": digest(meta["learned_documents"]),
        "documents": changes.fresh, "epochs": cfg.update_epochs, "rehearsal": cfg.update_rehearsal,
        "items": [len(new), len(rehearsed)]}}
    with accelerator.main_process_first():
        plan = make_plan(ws, lm, cfg, accelerator.num_processes, packing, show=show, items=new + rehearsed)
    plan.extra["update"] = {"new": len(new), "rehearsed": len(rehearsed)}
    lr = cfg.lr if cfg.lr is not None else float(getattr(kind, "default_lr", 1e-4))
    resume_from = resume_point(ws, name, runcfg, force, accelerator)
    run = Run(ws, name, kind, cfg, lm, plan, runcfg, accelerator, packing, lr, show)
    load_previous_weights(kind.name, run.module, ws.memory_dir(name), tokenizer=lm.tokenizer,
                          learned_texts=chunk_texts(ws, set(changes.unchanged)))
    if resume_from is not None:
        run.resume(resume_from)  # the checkpoint's weights replace the saved memory's
    run.loop()
    seconds = run.seconds_before + time.time() - run.t_start
    record.update(steps=run.step, seconds=round(seconds, 2), resumed_seconds=round(run.seconds_before, 2),
                  resumed_from_step=run.start_step if run.resumed else None)
    fresh_learned = {d: h for d, h in learned_documents(ws, plan.sources).items() if d in changes.fresh}
    record["documents"]["not_learned"] = sorted(set(changes.fresh) - set(fresh_learned))
    return run.finish(meta={
        **overlay,
        "config": meta.get("config"),  # the recipe stays the memory's: `engrain train` still finds it trained
        "steps": int(meta.get("steps") or 0) + run.step,  # the whole memory's, like its build time
        "train_seconds": round(float(meta.get("train_seconds") or 0.0) + seconds, 2),
        "learned_documents": {**changes.unchanged, **fresh_learned}})

"""Training state on disk: checkpoints written atomically (trainable weights, optimizer, scheduler, RNG states), resumed
with the same data order, a resumed run refused when its config changed, and the finished memory saved by its kind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from ..atomic import write_json
from ..workspace import Workspace

# Config keys that change how a run is operated but not what it computes: a resume may change them freely.
OPERATIONAL_KEYS = {"save_every", "keep_checkpoints", "eval_every"}


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


def save_checkpoint(ws: Workspace, name: str, step: int, module, optimizer, scheduler, state: dict, keep: int,
                    extra: dict[str, dict] | None = None) -> Path:
    """Write everything a resume needs into a temporary folder, then rename it: a kill never leaves half a one.
    ``extra`` maps more safetensors files' names to their tensors (the best evaluation's weights, the moving
    average), written inside the same folder so they are there exactly when the checkpoint is."""
    import torch
    from safetensors.torch import save_file

    from ..memory.parametric import trainable_state

    folder = run_dir(ws, name) / "checkpoints"
    final = folder / f"step-{step:07d}"
    tmp = folder / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(module), str(tmp / "trainable.safetensors"))
    for file, tensors in (extra or {}).items():
        save_file(tensors, str(tmp / file))
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


# Settings whose default changed after they were added: a config saved before a setting existed trained the way
# it behaved when it was added, not the way today's default does.
BEFORE_IT_EXISTED = {"lora_plus_ratio": 1.0}


def config_diff(old: dict, new: dict) -> list[str]:
    """The settings that differ. A setting missing on one side is its default there: a memory trained before the
    setting existed was trained the way its default behaves (new settings default to the earlier behaviour)."""
    from ..config import TrainConfig

    defaults = {**TrainConfig().model_dump(), **BEFORE_IT_EXISTED}
    keys = sorted((set(old) | set(new)) - OPERATIONAL_KEYS)
    before, after = ({k: d.get(k, defaults.get(k)) for k in keys} for d in (old, new))
    for side in (before, after):  # rows of seq_len is what an unset pack_tokens trained with, whatever the kind now
        if "pack_tokens" in side and side["pack_tokens"] is None:
            side["pack_tokens"] = side.get("seq_len", defaults["seq_len"])
    return [f"{k}: {before[k]!r} -> {after[k]!r}" for k in keys if before[k] != after[k]]


def save_memory(ws: Workspace, name: str, kind, module, meta: dict) -> Path:
    """Save into a temporary folder, write the meta file last, then swap it into place."""
    final = ws.memory_dir(name)
    tmp = ws.memories_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kind.save(module, tmp, meta)
    from ..memory.parametric import META_FILE

    write_json(tmp / META_FILE, meta)
    old = ws.memories_dir / f".{name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def recover_memory(ws: Workspace, name: str) -> None:
    """Put back a memory that ``save_memory`` moved aside when a kill came between its two renames (the only moment
    without a memory folder), and drop leftovers of interrupted saves."""
    from ..memory.parametric import META_FILE

    if not ws.memories_dir.is_dir():
        return
    final = ws.memory_dir(name)
    for old in sorted(ws.memories_dir.glob(f".{name}.old-*")):
        if not final.exists() and (old / META_FILE).is_file():
            os.replace(old, final)
        else:
            shutil.rmtree(old, ignore_errors=True)

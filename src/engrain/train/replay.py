"""Replay against forgetting: general data mixed into every run.

The base model's own greedy answers to general prompts (self-distillation, generated once and cached in the workspace)
and, when enabled, the general text engrain ships; with ``train.replay_kl`` the replay tokens are trained toward the
base model's top-k distribution (``distill.self_targets``).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from ..atomic import write_jsonl
from ..config import TrainConfig
from ..errors import EngrainError
from ..home import engrain_home
from ..jsonl import read_jsonl
from ..models import LM
from ..progress import note
from ..workspace import Workspace
from .data import Example, encode_item, file_safe


def _data_file(name: str) -> Path | None:
    from importlib import resources

    path = Path(str(resources.files("engrain").joinpath("data", name)))
    return path if path.is_file() else None


def replay_prompts() -> list[str]:
    """General prompts for self-distillation (shipped with the package; distinct from any evaluation set)."""
    path = _data_file("replay_prompts.txt")
    if path is None:
        return []
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]


# Rows decoded together while answering the replay prompts, more than `answer`'s default (which `engrain compare`
# keeps, so that its answers compare across runs): python bench/bench_answer_batch.py times the sizes side by side.
REPLAY_BATCH = 64


def self_distill_items(ws: Workspace, lm: LM, max_new_tokens: int, n_prompts: int | None = None) -> list[dict]:
    """The base model's greedy answers to the first ``n_prompts`` general prompts (all when None), generated once
    per model: cached in the workspace and, for a model engrain keeps in ENGRAIN_HOME (the embedded model, hub
    models), there too, so a new workspace on the same model reuses them; a larger pool generates only the prompts
    not yet answered (training on its own outputs keeps the model close to itself on general requests)."""
    from ..models import answer, answering_lm
    from ..progress import Progress

    every = replay_prompts()
    prompts = every[:n_prompts]
    if not prompts:
        return []
    name = f"self-distill-{file_safe(lm.name)}-{max_new_tokens}.jsonl"
    caches = [ws.root / "train" / "replay" / name]
    if (key := model_key(lm)) is not None:
        caches.append(engrain_home() / "replay" / key / name)
    have: dict[str, dict] = {}
    for cache in caches:
        if cache.is_file():
            for _, row in read_jsonl(cache, hint=f"Delete {cache}; the next run makes it again."):
                have.setdefault(row["messages"][0]["content"], row)
    missing = [p for p in prompts if p not in have]
    if missing:
        note(f"engrain: generating self-distillation replay data ({len(missing)} general prompts, once; cached in "
             f"{caches[-1]})")
        # In the dtype the model answers in (bf16 where native), not the fp32 it is trained in: these are its answers.
        with Progress(True, len(missing), 0, "replay answers") as bar:
            gens = answer(answering_lm(lm), missing, max_new_tokens=max_new_tokens, batch_size=REPLAY_BATCH,
                          progress=bar.advance)
        position = {p: i for i, p in enumerate(every)}
        for p, g in zip(missing, gens):  # an empty answer is the model's behaviour too
            have[p] = {"id": f"replay-sd-{position[p]}", "strategy": "self-distill", "generator": lm.name,
                       "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": g.text}]}
    rows = [have[p] for p in every if p in have]
    for cache in caches:
        if missing or not cache.is_file():
            write_jsonl(cache, rows)
    return [have[p] for p in prompts]


def model_key(lm: LM) -> str | None:
    """What identifies the weights the replay answers came from: the model folder's weight files (names, sizes,
    modification times). None for a model outside ENGRAIN_HOME (a user's own folder, which may be retrained in
    place): its answers stay in the workspace."""
    folder = Path(lm.path).resolve()
    if not folder.is_dir() or not folder.is_relative_to(engrain_home().resolve()):
        return None
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not files:
        return None
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha1(json.dumps([str(folder), stats]).encode()).hexdigest()[:16]


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
    want = round(n_train * cfg.replay_share / (1.0 - cfg.replay_share))
    pool: list[dict] = []
    for source in cfg.replay_sources:
        if source == "self_distill":
            # No more prompts answered than the mix draws: the base model's answers cost generation time of their own
            # (bench/bench_answer_batch.py), and a pool larger than the draw adds no prompt to it.
            n_prompts = want if cfg.replay_prompts is None else min(cfg.replay_prompts, want)
            pool += self_distill_items(ws, lm, cfg.replay_max_new_tokens, n_prompts)
        elif source == "general_text":
            pool += general_text_items()
        else:
            raise EngrainError(f"Unknown replay source '{source}' in train.replay_sources.",
                               hint="Use self_distill and/or general_text.")
    if not pool:
        note("engrain: no replay data available (no shipped prompts or text); training without replay")
        return []
    rng = random.Random(cfg.seed)
    order = list(range(len(pool)))
    rng.shuffle(order)
    picked = [pool[order[i % len(pool)]] for i in range(want)]
    return [encode_item(lm.tokenizer, item, f"{item['id']}#{i}", kind="replay") for i, item in enumerate(picked)]

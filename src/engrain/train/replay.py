"""Replay against forgetting: general data mixed into every run.

The base model's own greedy answers to general prompts (self-distillation, generated once and cached in the workspace)
and, when enabled, the general text engrain ships; with ``train.replay_kl`` the replay tokens are trained toward the
base model's top-k distribution (``distill.self_targets``).
"""

from __future__ import annotations

import random
from pathlib import Path

from ..atomic import write_jsonl
from ..config import TrainConfig
from ..errors import EngrainError
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


def self_distill_items(ws: Workspace, lm: LM, max_new_tokens: int, n_prompts: int | None = None) -> list[dict]:
    """The base model's greedy answers to the first ``n_prompts`` general prompts (all when None), generated once
    per model and cached in the workspace; a larger pool later generates only the prompts not yet answered
    (training on its own outputs keeps the model close to itself on general requests)."""
    from ..models import answer

    every = replay_prompts()
    prompts = every[:n_prompts]
    if not prompts:
        return []
    cache = ws.root / "train" / "replay" / f"self-distill-{file_safe(lm.name)}-{max_new_tokens}.jsonl"
    have: dict[str, dict] = {}
    if cache.is_file():
        for _, row in read_jsonl(cache, hint=f"Delete {cache}; the next run makes it again."):
            have[row["messages"][0]["content"]] = row
    missing = [p for p in prompts if p not in have]
    if missing:
        note(f"engrain: generating self-distillation replay data ({len(missing)} general prompts, once; cached in "
             f"{cache})")
        gens = answer(lm, missing, max_new_tokens=max_new_tokens)
        position = {p: i for i, p in enumerate(every)}
        for p, g in zip(missing, gens):  # an empty answer is the model's behaviour too
            have[p] = {"id": f"replay-sd-{position[p]}", "strategy": "self-distill", "generator": lm.name,
                       "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": g.text}]}
        write_jsonl(cache, [have[p] for p in every if p in have])
    return [have[p] for p in prompts]


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
            pool += self_distill_items(ws, lm, cfg.replay_max_new_tokens, cfg.replay_prompts)
        elif source == "general_text":
            pool += general_text_items()
        else:
            raise EngrainError(f"Unknown replay source '{source}' in train.replay_sources.",
                               hint="Use self_distill and/or general_text.")
    if not pool:
        note("engrain: no replay data available (no shipped prompts or text); training without replay")
        return []
    want = round(n_train * cfg.replay_share / (1.0 - cfg.replay_share))
    rng = random.Random(cfg.seed)
    order = list(range(len(pool)))
    rng.shuffle(order)
    picked = [pool[order[i % len(pool)]] for i in range(want)]
    return [encode_item(lm.tokenizer, item, f"{item['id']}#{i}", kind="replay") for i, item in enumerate(picked)]

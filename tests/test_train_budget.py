"""train.max_minutes: a run fits its steps, and its learning-rate decay, into a training-time budget, on a clock
the test controls (each reading of the trainer's clock is one second later)."""

from __future__ import annotations

import json

import pytest

from engrain.config import TrainConfig
from engrain.train import loop
from engrain.train.loop import lr_factor, train
from engrain.train.plan import BUDGET_TIMED_STEPS, steps_within
from engrain.workspace import Workspace

from test_train import FAST, write_synth


@pytest.fixture()
def ws(tmp_path) -> Workspace:
    w = Workspace.at(tmp_path / "ws")
    write_synth(w)
    return w


class Clock:
    """A time module whose time() moves one second each time it is read."""

    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        self.now += 1.0
        return self.now


def log(ws: Workspace) -> list[dict]:
    return [json.loads(line) for line in (ws.root / "train" / "lora" / "log.jsonl").read_text().splitlines()]


def config(**settings) -> TrainConfig:
    return TrainConfig(memory="lora", max_steps=40, lora_rank=2, lr=1e-3, **{**FAST, **settings})


def test_steps_within_the_budget_at_the_pace_so_far():
    assert steps_within(60, 10, 5, 100) == 30  # 2 s a step: 30 fit in a minute
    assert steps_within(60, 10, 5, 20) == 20  # never more than planned
    assert steps_within(60, 100, 50, 100) == 50  # the budget is spent: the run ends where it is
    assert steps_within(60, 0, 0, 100) == 100  # nothing timed yet


def test_a_run_over_budget_is_cut_and_its_decay_ends_at_the_cut(ws, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(loop, "time", Clock())  # two readings a step: 2 s a step, 15 steps in 30 s
    cfg = config(max_minutes=0.5, eval_every=7)
    summary = train(ws, cfg, str(tiny_model_dir), show_progress=False)
    assert BUDGET_TIMED_STEPS < summary["steps"] < 40
    assert summary["planned_steps"] == 40 and summary["cut_by_max_minutes"]
    records = log(ws)
    last = records[-1]
    assert last["step"] == summary["steps"] and last["seconds"] <= 30 + 2
    assert last["lr"] == pytest.approx(cfg.lr * cfg.min_lr_ratio)  # the cosine reached its floor, not cut halfway
    assert last["step"] % cfg.eval_every and "val_loss" in last  # the cut end is evaluated like a planned one
    before = next(r for r in records if r["step"] == BUDGET_TIMED_STEPS - 1)  # still on the uncut schedule
    assert before["lr"] == pytest.approx(cfg.lr * lr_factor(before["step"], 2, 40, cfg.min_lr_ratio))


def test_the_cut_is_said_once(ws, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(loop, "time", Clock())
    summary = train(ws, config(max_minutes=0.5), str(tiny_model_dir), show_progress=True)
    said = [line for line in capsys.readouterr().err.splitlines() if "train.max_minutes" in line]
    assert len(said) == 1 and "of the 40 planned steps fit" in said[0] and summary["cut_by_max_minutes"]


def test_a_run_within_budget_trains_every_planned_step(ws, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(loop, "time", Clock())
    summary = train(ws, config(max_minutes=60), str(tiny_model_dir), show_progress=False)
    assert summary["steps"] == summary["planned_steps"] == 40 and not summary["cut_by_max_minutes"]


def test_a_resumed_run_keeps_the_cut_schedule(ws, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(loop, "time", Clock())
    cfg = config(max_minutes=0.5, save_every=4)
    finish = loop.Run.finish

    def crash(self, meta=None):
        raise RuntimeError("killed before the memory was saved")

    monkeypatch.setattr(loop.Run, "finish", crash)
    with pytest.raises(RuntimeError):
        train(ws, cfg, str(tiny_model_dir), show_progress=False)
    cut = log(ws)[-1]["step"]
    assert cut < 40
    monkeypatch.setattr(loop.Run, "finish", finish)
    summary = train(ws, cfg, str(tiny_model_dir), show_progress=False)
    start = summary["resumed_from_step"]
    assert start is not None and start < cut
    # The first resumed step decays toward the cut end the checkpoint holds, not toward the 40 planned.
    resumed = [r for r in log(ws) if r["step"] == start + 1][-1]
    assert resumed["lr"] == pytest.approx(cfg.lr * lr_factor(start + 1, 2, cut, cfg.min_lr_ratio))
    assert resumed["lr"] != pytest.approx(cfg.lr * lr_factor(start + 1, 2, 40, cfg.min_lr_ratio))


def test_dry_run_says_what_the_budget_would_leave(ws, tiny_model_dir):
    report = train(ws, config(max_minutes=1e-6), str(tiny_model_dir), dry_run=True, show_progress=False)
    # a microsecond holds no step: the run would end once its first steps are timed
    assert report["steps"] == 40 and report["steps_within_max_minutes"] == BUDGET_TIMED_STEPS
    roomy = train(ws, config(max_minutes=600), str(tiny_model_dir), dry_run=True, show_progress=False)
    assert roomy["steps_within_max_minutes"] == 40  # never more than planned

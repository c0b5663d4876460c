"""Crash safety and scale-out of the trainer with real processes: a run killed with SIGKILL resumes to the same
weights as an uninterrupted run, and 2 DDP processes (gloo on CPU) equal one process with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engrain.workspace import Workspace

from test_train import write_synth

ROOT = Path(__file__).resolve().parents[1]


def make_ws(path: Path, train: dict) -> Workspace:
    ws = Workspace.at(path)
    write_synth(ws, n=16)
    ws.config_path.write_text(yaml.safe_dump({"train": train}))
    return ws


def adapter(ws: Workspace, name: str = "lora") -> dict:
    from safetensors.torch import load_file

    return load_file(str(ws.memory_dir(name) / "adapter_model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    import torch

    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, f"largest difference {worst}"
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in a.values())


def cli(ws: Workspace, model_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "engrain.cli", "train", "-w", str(ws.root), "--memory", "lora",
            "--model", str(model_dir), *extra]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT / "tests") + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"  # the same reduction order in every process
    return e


@pytest.mark.parametrize("averaged", [False, True], ids=["trained-weights", "moving-average"])
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, tiny_model_dir, averaged):
    train = dict(max_steps=14, save_every=3, seq_len=96, micro_batch=2, replay_share=0.0, eval_every=5,
                 lora_rank=4, lora_dropout=0.1, lr=3e-3)  # dropout: the RNG state must be restored too
    if averaged:  # the average is the memory kept, so a resume must restore it too
        train.update(ema_horizon=0.5, keep_best=False)
    ws_a, ws_b = make_ws(tmp_path / "a", train), make_ws(tmp_path / "b", train)

    done = subprocess.run(cli(ws_a, tiny_model_dir, "--json"), env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    uninterrupted = json.loads(done.stdout.strip().splitlines()[-1])

    proc = subprocess.Popen(cli(ws_b, tiny_model_dir), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt_dir = ws_b.root / "train" / "lora" / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if ckpt_dir.is_dir() and any(p.name.startswith("step-") for p in ckpt_dir.iterdir()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (ws_b.memory_dir("lora") / "engrain_memory.json").exists()

    resumed = subprocess.run(cli(ws_b, tiny_model_dir, "--json"), env=env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming 'lora' from step" in resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 14 and summary["resumed_from_step"] >= 3
    # Tokens and time count the run before the kill too (up to its checkpoint), not only the resumed stretch.
    assert summary["train_tokens"] == uninterrupted["train_tokens"]
    log = [json.loads(line) for line in (ws_b.root / "train" / "lora" / "log.jsonl").read_text().splitlines()]
    before_kill = next(r["seconds"] for r in log if r["step"] == summary["resumed_from_step"])
    assert summary["train_seconds"] > before_kill > 0
    # The killed process's seconds: the log rounds to 0.1 s and the summary to 0.01 s, so they may differ by 0.055.
    assert summary["train_seconds"] > summary["resumed_seconds"] >= before_kill - 0.06
    assert_same_weights(adapter(ws_a), adapter(ws_b), atol=1e-6)
    assert not ckpt_dir.exists()  # checkpoints go once the memory is saved


def test_resume_with_changed_config_is_refused(tmp_path, tiny_model_dir, tiny_lm):
    import torch

    from engrain.config import TrainConfig
    from engrain.errors import EngrainError
    from engrain.train.loop import run_config, train
    from engrain.train.checkpoints import save_checkpoint

    ws = make_ws(tmp_path / "ws", {})
    cfg = TrainConfig(max_steps=6, save_every=2, seq_len=96, replay_share=0.0, eval_every=0, lora_rank=2)
    # the checkpoint an interrupted run of `cfg` leaves behind (refusal happens before any weight is read)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(ws, "lora", 2, torch.nn.Linear(1, 1), opt, sched, {"config": run_config(cfg, tiny_lm)}, keep=2)
    with pytest.raises(EngrainError) as err:
        train(ws, cfg.model_copy(update={"seq_len": 128}), str(tiny_model_dir), show_progress=False)
    assert "step 2" in err.value.message and "seq_len: 96 -> 128" in err.value.message and "--force" in err.value.hint
    # operational settings may change on resume; --force starts over with the new config
    summary = train(ws, cfg.model_copy(update={"seq_len": 128}), str(tiny_model_dir), force=True, show_progress=False)
    assert summary["steps"] == 6 and summary["resumed_from_step"] is None


def test_two_ddp_processes_equal_one_process(tmp_path, tiny_model_dir):
    common = dict(max_steps=4, seq_len=96, micro_batch=1, replay_share=0.0, eval_every=0, save_every=0,
                  lora_rank=4, lr=3e-3, val_fraction=0.0)
    single = make_ws(tmp_path / "single", {**common, "grad_accum": 2})  # global batch: 2 rows
    ddp = make_ws(tmp_path / "ddp", {**common, "grad_accum": 1})  # 2 processes x 1 row
    one = subprocess.run(cli(single, tiny_model_dir, "--json"), env=env(), capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr
    # torchrun sets the process-group environment that accelerate.Accelerator picks up (gloo on CPU); the same
    # command runs under `accelerate launch` on a multi-GPU machine.
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "engrain.cli", *cli(ddp, tiny_model_dir, "--json")[3:]]
    two = subprocess.run(launch, env=env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    summary = json.loads([ln for ln in two.stdout.splitlines() if ln.startswith("{")][-1])
    assert summary["processes"] == 2
    assert_same_weights(adapter(single), adapter(ddp), atol=2e-5)


def test_two_ddp_processes_cut_to_a_budget_at_the_same_step(tmp_path, tiny_model_dir):
    """train.max_minutes under DDP: the processes judge by the slowest one's clock, so they stop together instead of
    one waiting forever in a collective the other left."""
    from engrain.train.plan import BUDGET_TIMED_STEPS

    ws = make_ws(tmp_path / "ddp", dict(max_steps=12, max_minutes=1e-6, seq_len=96, micro_batch=1, replay_share=0.0,
                                        eval_every=0, save_every=0, lora_rank=2, val_fraction=0.0))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "engrain.cli", *cli(ws, tiny_model_dir, "--json")[3:]]
    run = subprocess.run(launch, env=env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads([ln for ln in run.stdout.splitlines() if ln.startswith("{")][-1])
    assert summary["processes"] == 2 and summary["cut_by_max_minutes"]
    assert summary["steps"] == BUDGET_TIMED_STEPS and summary["planned_steps"] == 12

"""Model loading, the cache, the chat template and batched generation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engrain.errors import EngrainError
from engrain.models import (
    EMBEDDED_NAME,
    MANIFEST,
    chat_messages,
    chat_prompt,
    end_of_turn,
    generate,
    load_model,
    resolve_model,
)


def test_unknown_model_lists_what_is_accepted(tmp_path):
    with pytest.raises(EngrainError) as err:
        resolve_model(str(tmp_path / "no-such-model"))
    assert "Accepted --model values" in str(err.value)
    assert ".gguf" in str(err.value)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(EngrainError, match="config.json"):
        resolve_model(str(tmp_path))


def test_file_that_is_not_gguf_is_refused(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 10)
    with pytest.raises(EngrainError, match="not a .gguf"):
        resolve_model(str(f))


def test_local_folder_loads(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), device="cpu")
    assert lm.name == tiny_model_dir.name
    assert lm.tokenizer.padding_side == "left"
    assert lm.tokenizer.pad_token != lm.tokenizer.eos_token


def test_loaded_models_run_no_hub_kernels(tiny_model_dir):
    """transformers would swap some layers for kernel code fetched from the Hugging Face Hub when a model trains on a
    GPU (found on one: offline, training failed there); engrain loads every model with its own modules."""
    from engrain.models import load_model

    lm = load_model(str(tiny_model_dir), device="cpu")
    assert lm.model.use_kernels is False
    lm.model.train()  # where kernels are on, this is when transformers fetches them
    assert lm.model.use_kernels is False


def test_chat_template_is_one_source_of_truth(tokenizer):
    messages = chat_messages("Who founded Veltrix?", context="Veltrix was founded by Mara Olsen.")
    prompt = chat_prompt(tokenizer, messages)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "Veltrix was founded by Mara Olsen." in prompt
    # The text training appends after an answer closes the turn exactly as the template does.
    full = chat_prompt(tokenizer, messages + [{"role": "assistant", "content": "Mara Olsen"}], add_generation_prompt=False)
    assert full.startswith(prompt)
    assert full[len(prompt):].startswith("Mara Olsen" + end_of_turn(tokenizer))


def test_batched_greedy_equals_one_at_a_time(tiny_lm):
    prompts = [chat_prompt(tiny_lm.tokenizer, chat_messages(q)) for q in
               ["What is two plus two?", "Name a colour of the sky at noon on a clear day in summer.", "Hi"]]
    batched = generate(tiny_lm, prompts, max_new_tokens=8, batch_size=3)
    single = [generate(tiny_lm, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert [g.text for g in batched] == [g.text for g in single]
    assert all(g.completion_tokens <= 8 for g in batched)
    assert [g.prompt_tokens for g in batched] == [len(tiny_lm.tokenizer(p, add_special_tokens=False)["input_ids"])
                                                  for p in prompts]


def test_sampling_is_seeded_and_stop_strings_cut(tiny_lm):
    prompt = [chat_prompt(tiny_lm.tokenizer, chat_messages("Tell me a story."))]
    a = generate(tiny_lm, prompt, max_new_tokens=12, temperature=0.9, seed=3)[0].text
    b = generate(tiny_lm, prompt, max_new_tokens=12, temperature=0.9, seed=3)[0].text
    assert a == b
    greedy = generate(tiny_lm, prompt, max_new_tokens=12)[0]
    if len(greedy.text) > 3:
        stop = greedy.text[2:4]
        cut = generate(tiny_lm, prompt, max_new_tokens=12, stop=[stop])[0]
        assert stop not in cut.text and cut.finish_reason == "stop"


def test_overlong_prompt_is_a_clear_error(tiny_lm):
    prompt = "word " * 3000
    with pytest.raises(EngrainError, match="exceeds the model's window"):
        generate(tiny_lm, [prompt], max_new_tokens=8)


@pytest.mark.slow
def test_embedded_model_generates(embedded_lm):
    """The real SmolLM2-135M-Instruct, loaded from the cache, answers a question it knows."""
    assert embedded_lm.name == EMBEDDED_NAME
    out = generate(embedded_lm, [chat_prompt(embedded_lm.tokenizer, chat_messages("What is the capital of France?"))],
                   max_new_tokens=16)[0]
    assert "paris" in out.text.lower()


def _run_cli(args, env_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ENGRAIN_HOME": str(env_home)}
    return subprocess.run([sys.executable, "-m", "engrain.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
def test_corrupt_cache_is_detected_and_rebuilt(embedded_path, tmp_path):
    """A half-written cached model (manifest size mismatch) is rebuilt from the GGUF, not loaded."""
    from engrain import models

    home = tmp_path / "home"
    (home / "downloads").mkdir(parents=True)
    # Reuse the GGUF already fetched for this session so the test needs no network.
    gguf = embedded_path.parents[1] / "downloads" / models.EMBEDDED_GGUF_NAME
    if not gguf.exists():
        pytest.skip("the session cache holds no GGUF to copy")
    (home / "downloads" / gguf.name).symlink_to(gguf)
    broken = home / "models" / EMBEDDED_NAME
    broken.mkdir(parents=True)
    (broken / "model.safetensors").write_bytes(b"truncated")
    (broken / MANIFEST).write_text(json.dumps({"files": {"model.safetensors": 999}}))
    proc = _run_cli(["ask", "What is the capital of France?", "--json", "-w", str(tmp_path / "ws")], home)
    assert proc.returncode == 0, proc.stderr
    assert "incomplete; rebuilding" in proc.stderr
    assert "paris" in json.loads(proc.stdout.strip().splitlines()[-1])["answer"].lower()


def test_cli_bad_model_is_a_message_not_a_traceback(tmp_path):
    proc = _run_cli(["ask", "hi", "--model", str(tmp_path / "nope"), "-w", str(tmp_path / "ws")], tmp_path / "home")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "Accepted --model values" in proc.stderr


def test_doctor_reports_versions_and_cache(tmp_path):
    proc = _run_cli(["doctor", "--json"], tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["versions"]["torch"] != "not installed"
    assert info["embedded_model_cached"] is False  # a fresh ENGRAIN_HOME holds nothing yet
    assert "bf16_supported" in info and "torch_threads" in info
    assert info["cpu"]["model"] and "amx_tiles" in info["cpu"]  # what a bug report about speed or numerics needs
    assert info["cpu_prefill_dtype"] in ("bfloat16", "float32", "int8")  # what model.prefill_dtype: auto picks here


def test_no_registry_on_first_use_says_how_to_place_the_model_by_hand(tmp_path):
    env = {**os.environ, "ENGRAIN_HOME": str(tmp_path / "home"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "",
           "PIP_CONFIG_FILE": os.devnull}
    proc = subprocess.run([sys.executable, "-m", "engrain.cli", "ask", "hi", "-w", str(tmp_path / "ws")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "Place it by hand" in proc.stderr and "SmolLM2-135M-Instruct.Q4_1.gguf" in proc.stderr


def test_auto_dtype_is_bf16_only_where_the_device_computes_it(monkeypatch):
    import torch

    from engrain.models import load as loading

    monkeypatch.setattr(loading, "bf16_supported", lambda device: True)
    assert loading.pick_dtype("cpu") is torch.bfloat16
    monkeypatch.setattr(loading, "bf16_supported", lambda device: False)
    assert loading.pick_dtype("cpu") is torch.float32  # emulated bf16 is slower than fp32
    assert loading.pick_dtype("cuda") is torch.float16
    assert loading.pick_dtype("cpu", "float32") is torch.float32


def test_training_takes_bf16_on_a_cpu_only_where_its_products_measure_faster(monkeypatch):
    from engrain.models import load as loading
    from engrain.train.precision import use_bf16

    speedup = loading.bf16_speedup_cpu()  # the real measurement on this CPU: a ratio, or 0.0 where bf16 is emulated
    assert speedup == 0.0 if not loading.bf16_supported("cpu") else speedup > 0
    assert use_bf16("auto", "cpu") == (speedup >= loading.BF16_TRAINING_MARGIN)
    for measured, expected in ((0.0, False), (0.6, False), (1.1, False), (2.5, True)):
        monkeypatch.setattr(loading, "bf16_speedup_cpu", lambda measured=measured: measured)
        assert use_bf16("auto", "cpu") is expected, measured
        assert use_bf16("on", "cpu") is True and use_bf16("off", "cpu") is False  # an explicit setting is obeyed


def test_a_workspace_answers_in_its_configured_dtype(tmp_path, tiny_model_dir):
    import torch

    from engrain.models import load_for_workspace

    ws = tmp_path / "ws"
    ws.mkdir()
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        (ws / "engrain.yaml").write_text(f"model:\n  dtype: {name}\n  prefill_dtype: {name}\n")
        lm = load_for_workspace(ws, str(tiny_model_dir), device="cpu")
        assert next(lm.model.parameters()).dtype == dtype
        assert lm.model.engrain_prefill_dtype == name  # what packed_weights packs a bf16 model's layers in


def test_answering_lm_converts_a_training_copy_and_leaves_the_original(monkeypatch, tiny_lm):
    import torch

    from engrain.models import answering_lm
    from engrain.models import load as loading

    monkeypatch.setattr(loading, "bf16_supported", lambda device: True)
    fast = answering_lm(tiny_lm)
    assert next(fast.model.parameters()).dtype == torch.bfloat16
    assert next(tiny_lm.model.parameters()).dtype == torch.float32  # the model being trained is untouched
    assert answering_lm(fast) is fast
    monkeypatch.setattr(loading, "bf16_supported", lambda device: False)
    assert answering_lm(tiny_lm) is tiny_lm

"""The GPU paths, on a tiny Llama: skipped where torch sees no CUDA device (CI has none; a machine with one runs them).

What a user with a GPU meets first: ``load_model`` picks the GPU and its half precision, the decode loop and the
server's continuous batching run there and agree with ``generate()``, and ``engrain train`` trains a LoRA memory on
the GPU that then answers from it.
"""

from __future__ import annotations

import pytest
from stream_loop import decode_all

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

PROMPTS = [[5, 17, 230, 41, 9, 88], [5, 17, 230, 7], [5, 17, 230, 41, 9, 88, 301, 12, 64]]


def _greedy_reference(model, prompts: list[list[int]], new: int, pad_id: int) -> list[list[int]]:
    """``generate()``'s greedy tokens, one prompt at a time (no padding to round differently)."""
    out = []
    for p in prompts:
        ids = torch.tensor([p], device=model.device)
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             pad_token_id=pad_id, eos_token_id=None, temperature=None, top_p=None, top_k=None)
        out.append(seq[0, len(p):].tolist())
    return out


def test_load_model_picks_the_gpu_and_a_half_precision_it_computes(tiny_model_dir):
    from engrain.models import load_model

    lm = load_model(str(tiny_model_dir))
    assert lm.model.device.type == "cuda"
    assert lm.model.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def test_decode_loop_on_the_gpu_gives_generates_greedy_tokens(tiny_model_dir):
    from engrain.models import fastgen, load_model

    lm = load_model(str(tiny_model_dir), device="cuda", dtype="float32")
    pad = lm.tokenizer.pad_token_id
    got = fastgen.generate_many(lm.model, PROMPTS, batch_size=2, max_new_tokens=12, stop_ids=[-1], pad_id=pad)
    assert got == _greedy_reference(lm.model, PROMPTS, 12, pad)


def test_server_stream_on_the_gpu_matches_the_decode_loop(tiny_model_dir):
    from engrain.models import fastgen, load_model
    from engrain.models.prompt_cache import PromptCache
    from engrain.models.stream import Stream

    lm = load_model(str(tiny_model_dir), device="cuda", dtype="float32")
    pad = lm.tokenizer.pad_token_id
    want = fastgen.generate_many(lm.model, PROMPTS, batch_size=3, max_new_tokens=10, stop_ids=[-1], pad_id=pad)
    stream = Stream(lm.model, pad_id=pad, prompt_cache=PromptCache())
    for _ in range(2):  # the second time the prompts' KV comes from the prompt cache
        assert decode_all(stream, PROMPTS, 10) == want


def test_lora_trains_on_the_gpu_and_answers_from_it(tmp_path, tiny_model_dir):
    from engrain.config import TrainConfig
    from engrain.memory.registry import open_memory
    from engrain.models import load_model
    from engrain.train.loop import train
    from engrain.workspace import Workspace
    from test_train import FAST, write_synth

    ws = Workspace.at(tmp_path / "ws")
    write_synth(ws)
    summary = train(ws, TrainConfig(memory="lora", max_steps=4, lora_rank=4, lr=5e-3, **FAST), str(tiny_model_dir),
                    show_progress=False)
    assert summary["steps"] == 4 and summary["final_train_loss"] < 11.5
    memory = open_memory("lora", ws, load_model(str(tiny_model_dir)))
    assert next(memory.lm.model.parameters()).device.type == "cuda"
    answers = memory.answer(["What is the code of vault 3?"], max_new_tokens=4)
    assert len(answers) == 1 and answers[0].prompt_tokens > 0

"""Fused decoding (models/fused.py): one reading decodes as plain greedy generation does; readings that cancel
leave the first one's answer; a weighted change moves the answer; a hybrid under rag.hybrid fused uses it."""

from __future__ import annotations

import copy

import pytest
import torch

from engrain.errors import EngrainError
from engrain.models import LM, chat_messages, chat_prompt, fused_generate, generate

QUESTIONS = ["Who founded Acme Robotics?", "What colour is the sky on Mars at noon?", "Name a prime number."]


def prompts(lm, context: str | None = None) -> list[str]:
    return [chat_prompt(lm.tokenizer, chat_messages(q, context, None)) for q in QUESTIONS]


def changed(lm: LM, scale: float = 0.5) -> LM:
    """``lm`` with every linear weight of its last block perturbed: a stand-in for a trained memory."""
    model = copy.deepcopy(lm.model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.model.layers[-1].parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * scale * p.std())
    return LM(model=model, tokenizer=lm.tokenizer, name="changed", path=lm.path, device=lm.device)


def texts(gens) -> list[str]:
    return [g.text for g in gens]


def test_one_reading_is_greedy_generation(tiny_lm):
    ps = prompts(tiny_lm, "Acme Robotics was founded by Ada Brook in 1999.")
    fused = fused_generate([(tiny_lm, ps, 1.0)], max_new_tokens=12, batch_size=2)
    plain = generate(tiny_lm, ps, max_new_tokens=12, batch_size=2)
    assert texts(fused) == texts(plain)
    assert [g.completion_tokens for g in fused] == [g.completion_tokens for g in plain]


def test_cancelling_readings_leave_the_first_answer(tiny_lm):
    with_chunks, closed = prompts(tiny_lm, "Acme Robotics was founded by Ada Brook in 1999."), prompts(tiny_lm)
    plain = generate(tiny_lm, with_chunks, max_new_tokens=12)
    same = fused_generate([(tiny_lm, with_chunks, 1.0), (tiny_lm, closed, 1.0), (tiny_lm, closed, -1.0)],
                          max_new_tokens=12)
    assert texts(same) == texts(plain)


def test_a_weighted_change_moves_the_answer(tiny_lm):
    memory = changed(tiny_lm)
    with_chunks, closed = prompts(tiny_lm, "Acme Robotics was founded by Ada Brook in 1999."), prompts(tiny_lm)
    plain = texts(generate(tiny_lm, with_chunks, max_new_tokens=12))
    fused = texts(fused_generate([(tiny_lm, with_chunks, 1.0), (memory, closed, 4.0), (tiny_lm, closed, -4.0)],
                                 max_new_tokens=12))
    assert fused != plain


def test_the_fused_token_is_the_argmax_of_the_weighted_sum(tiny_lm):
    memory = changed(tiny_lm)
    ps = prompts(tiny_lm)[:1]
    first = fused_generate([(tiny_lm, ps, 1.0), (memory, ps, 2.0)], max_new_tokens=1)[0]
    ids = torch.tensor([tiny_lm.tokenizer(ps[0], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        a = torch.log_softmax(tiny_lm.model(ids).logits[0, -1].float(), -1)
        b = torch.log_softmax(memory.model(ids).logits[0, -1].float(), -1)
    want = tiny_lm.tokenizer.decode([int((a + 2.0 * b).argmax())], skip_special_tokens=True).strip()
    assert first.text == want


def test_fused_decoding_refuses_the_generic_path(tiny_lm, monkeypatch):
    monkeypatch.setenv("ENGRAIN_FASTGEN", "0")
    with pytest.raises(EngrainError, match="rag.hybrid"):
        fused_generate([(tiny_lm, prompts(tiny_lm), 1.0)], max_new_tokens=4)


def test_the_servers_fused_stream_answers_as_the_batch_path(tiny_lm):
    """FusedStream (the server's fused hybrid), a request joining after the first step: each request's tokens are
    the batch path's."""
    from engrain.models.fused import FusedStream, Reading, fused_tokens
    from engrain.models.stream import Stream

    memory, tok = changed(tiny_lm), tiny_lm.tokenizer

    def encode(ps: list[str]) -> list[list[int]]:
        return [tok(p, add_special_tokens=False)["input_ids"] for p in ps]

    with_chunks = encode(prompts(tiny_lm, "Acme Robotics was founded by Ada Brook in 1999."))
    closed = encode(prompts(tiny_lm))
    want = fused_tokens([Reading(tiny_lm.model, with_chunks, 1.0), Reading(memory.model, closed, 2.0),
                         Reading(tiny_lm.model, closed, -2.0)], max_new_tokens=8, stop_ids=[-1],
                        pad_id=tok.pad_token_id)
    streams = [Stream(model, pad_id=tok.pad_token_id) for model in (tiny_lm.model, memory.model, tiny_lm.model)]
    stream = FusedStream(streams, [1.0, 2.0, -2.0])
    handles = stream.admit([with_chunks[:2], closed[:2], closed[:2]], [8, 8])
    assert len(stream) == 2
    got: dict[int, list[int]] = {}
    while len(stream):
        for h, t in stream.step():
            got.setdefault(h, []).append(t)
        stream.advance(set())
        if len(handles) == 2:
            handles += stream.admit([with_chunks[2:], closed[2:], closed[2:]], [8])
    assert [got[h] for h in handles] == want

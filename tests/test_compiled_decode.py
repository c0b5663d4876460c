"""The int8 decode step under torch.compile (``models/compiled_decode.py``): the same greedy tokens as the eager step
in fp32, only where the model was loaded to compile, and the eager step taking over when compiling fails."""

from __future__ import annotations

import copy

import torch


def _int8(model, compile_decode: bool):
    from engrain.models import compiled_decode, decode_weights

    model = copy.deepcopy(model)
    setattr(model, decode_weights.ATTRIBUTE, "int8")
    setattr(model, compiled_decode.ATTRIBUTE, compile_decode)
    return model


def _prompts(tok):
    return [tok(t)["input_ids"] for t in ["The capital of", "A bee makes honey and", "Why is the sky"]]


def test_compiled_step_decodes_the_eager_tokens(tiny_lm, tmp_path, monkeypatch):
    from engrain.models import compiled_decode, fastgen

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    calls = []
    real_run = compiled_decode.run
    monkeypatch.setattr(compiled_decode, "run", lambda *a: calls.append(1) or real_run(*a))
    tok = tiny_lm.tokenizer
    kw = dict(max_new_tokens=10, stop_ids=[-1], pad_id=tok.pad_token_id)
    eager, compiled = _int8(tiny_lm.model, False), _int8(tiny_lm.model, True)
    for batch in (1, 3):  # one row, and a batch whose rows leave and join (dynamic shapes)
        want = fastgen.generate_many(eager, _prompts(tok), batch_size=batch, **kw)
        assert not calls
        assert fastgen.generate_many(compiled, _prompts(tok), batch_size=batch, **kw) == want
        assert calls
        calls.clear()
    assert fastgen._forward not in compiled_decode._failed


def test_a_failed_compile_falls_back_to_the_eager_step(tiny_lm, monkeypatch, capsys):
    from engrain.models import compiled_decode, fastgen

    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(compiled_decode, "_compiled", {})
    monkeypatch.setattr(compiled_decode, "_failed", set())
    tok = tiny_lm.tokenizer
    kw = dict(max_new_tokens=6, stop_ids=[-1], pad_id=tok.pad_token_id, batch_size=2)
    want = fastgen.generate_many(_int8(tiny_lm.model, False), _prompts(tok), **kw)
    assert fastgen.generate_many(_int8(tiny_lm.model, True), _prompts(tok), **kw) == want
    assert "compiling the decode step failed" in capsys.readouterr().err
    assert fastgen._forward in compiled_decode._failed


def test_compile_decode_follows_the_configuration(tiny_model_dir):
    from engrain.models import compiled_decode, load_model

    assert not compiled_decode.wanted(load_model(str(tiny_model_dir), device="cpu", dtype="float32").model)
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32", decode_weights="int8", compile_decode=True)
    assert compiled_decode.wanted(lm.model)


def test_another_model_object_decodes_its_own_weights_through_the_same_graph(tiny_lm, tmp_path, monkeypatch):
    """A server's merged LoRA copy is another module tree with other weights: the step compiled for the base model
    must read the copy's weights (they are graph inputs, not constants baked in), without compiling again."""
    from torch._dynamo.utils import counters

    from engrain.models import fastgen

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    tok = tiny_lm.tokenizer
    kw = dict(max_new_tokens=10, stop_ids=[-1], pad_id=tok.pad_token_id, batch_size=2)
    first = _int8(tiny_lm.model, True)
    fastgen.generate_many(first, _prompts(tok), **kw)
    graphs = counters["stats"]["unique_graphs"]
    other = copy.deepcopy(tiny_lm.model)
    with torch.no_grad():
        for p in other.model.layers[0].mlp.parameters():
            p.mul_(3.0)
    want = fastgen.generate_many(_int8(other, False), _prompts(tok), **kw)
    assert want != fastgen.generate_many(_int8(tiny_lm.model, False), _prompts(tok), **kw)  # the weights matter
    assert fastgen.generate_many(_int8(other, True), _prompts(tok), **kw) == want
    assert counters["stats"]["unique_graphs"] == graphs

"""The decode loop's quantized weights (``models/decode_weights.py``): int8 error bounded per row, 4-bit groups kept
only where they are exact, the fused paths computing the same function as the model's modules, rebuilt when weights
change, and chosen as configured."""

from __future__ import annotations

import copy

import pytest
import torch


def _exact_int8_copy(model):
    """A copy of ``model`` whose linear weights are exactly int8 values times one scale per row, so the int8 path
    and the model's own modules compute the same products (up to float rounding), and it decodes with int8."""
    from engrain.models import decode_weights

    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in model.modules():
            if type(m) is torch.nn.Linear:
                q = decode_weights.quantize(m.weight, torch.float32)
                m.weight.copy_(q.weight.float() * q.scale[:, None])
    setattr(model, decode_weights.ATTRIBUTE, "int8")
    return model


def test_quantize_error_is_at_most_half_a_step_per_row():
    from engrain.models.decode_weights import quantize

    w = torch.randn(48, 32) * torch.linspace(0.01, 3.0, 48)[:, None]
    q = quantize(w, torch.float32)
    assert q.weight.dtype == torch.int8 and q.scale.shape == (48,)
    err = (q.weight.float() * q.scale[:, None] - w).abs().amax(dim=1)
    assert bool((err <= q.scale / 2 + 1e-7).all())
    x = torch.randn(3, 32)
    assert torch.allclose(q(x), x @ (q.weight.float() * q.scale[:, None]).T, atol=1e-4)


def test_int8_path_decodes_the_same_tokens_as_the_modules(tiny_lm):
    """On weights int8 represents exactly, the fused projections, one-pass rotary, fused norm and int8 head give the
    greedy tokens of the model's own modules, alone and in a continuous batch."""
    from engrain.models import decode_weights

    exact = _exact_int8_copy(tiny_lm.model)
    assert decode_weights.for_model(exact) is not None
    _decodes_as_its_modules(exact, tiny_lm.tokenizer)


def _decodes_as_its_modules(model, tok) -> None:
    """``model``'s greedy tokens through its quantized decode weights equal a copy's through its own modules, one
    row at a time and in a continuous batch."""
    from engrain.models import decode_weights, fastgen

    reference = copy.deepcopy(model)
    setattr(reference, decode_weights.ATTRIBUTE, "model")
    assert decode_weights.for_model(reference) is None
    prompts = [tok(t)["input_ids"] for t in ["The capital of", "A bee makes honey and", "Why is the sky"]]
    kw = dict(max_new_tokens=12, stop_ids=[-1], pad_id=tok.pad_token_id)
    for batch in (1, 3):
        assert fastgen.generate_many(model, prompts, batch_size=batch, **kw) == \
            fastgen.generate_many(reference, prompts, batch_size=batch, **kw)


def test_int8_logits_stay_close_on_ordinary_weights(tiny_lm):
    from engrain.models import decode_weights, fastgen

    model = copy.deepcopy(tiny_lm.model)
    setattr(model, decode_weights.ATTRIBUTE, "int8")
    ids = torch.tensor([tiny_lm.tokenizer("Once upon a time there was")["input_ids"]])
    n = ids.shape[1]
    with torch.inference_mode():
        caches = fastgen._zero_caches(model, 1, n + 1, "cpu")
        mask = torch.ones(1, n + 1, dtype=torch.bool)
        fastgen._forward(model, ids[:, :-1], torch.arange(n - 1)[None], caches, 0, mask)
        step = (ids[:, -1:], torch.tensor([[n - 1]]), caches, n - 1, mask)
        ref = fastgen._forward(model, *step)
        int8 = fastgen._forward(model, *step, None, decode_weights.for_model(model))
    assert torch.nn.functional.cosine_similarity(ref, int8).item() > 0.999
    assert not torch.equal(ref, int8)  # it did run the int8 products


def test_int8_weights_are_rebuilt_when_the_model_changes(tiny_lm):
    from engrain.models import decode_weights

    model = copy.deepcopy(tiny_lm.model)
    setattr(model, decode_weights.ATTRIBUTE, "int8")
    first = decode_weights.for_model(model)
    assert decode_weights.for_model(model) is first  # cached while nothing changes
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.data.mul_(2.0)  # in place, as a merge or training step does
    assert decode_weights.for_model(model) is not first


def test_blocks_that_are_not_plain_linears_run_as_modules(tiny_lm):
    """A block whose MLP is wrapped (as a memory layer wraps it) keeps its module; the other blocks go int8, and the
    tokens still equal the modules' own on exactly representable weights."""
    from engrain.models import decode_weights, fastgen

    class Wrapped(torch.nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.mlp = mlp

        def forward(self, x):
            return self.mlp(x)

    exact = _exact_int8_copy(tiny_lm.model)
    exact.model.layers[1].mlp = Wrapped(exact.model.layers[1].mlp)
    weights = decode_weights.for_model(exact)
    assert weights.blocks[1].gate_up is None and weights.blocks[1].qkv is not None
    assert weights.blocks[0].gate_up is not None
    reference = copy.deepcopy(exact)
    setattr(reference, decode_weights.ATTRIBUTE, "model")
    prompts = [tiny_lm.tokenizer("The river runs")["input_ids"]]
    kw = dict(batch_size=1, max_new_tokens=10, stop_ids=[-1], pad_id=tiny_lm.tokenizer.pad_token_id)
    assert fastgen.generate_many(exact, prompts, **kw) == fastgen.generate_many(reference, prompts, **kw)


def test_decode_weights_follow_the_configuration(tiny_model_dir, monkeypatch):
    from engrain.errors import EngrainError
    from engrain.models import decode_weights, load, load_model
    from engrain.models.load import pick_decode_weights

    monkeypatch.setattr(load, "bf16_supported", lambda device: True)
    assert pick_decode_weights("cpu", "auto", "auto") == "int4"
    monkeypatch.setattr(load, "bf16_supported", lambda device: False)
    assert pick_decode_weights("cpu", "auto", "auto") == "model"  # fp32 activations: the int8 kernel is slow
    monkeypatch.setattr(load, "bf16_supported", lambda device: True)
    assert pick_decode_weights("cpu", "float32", "auto") == "model"  # the reference path stays the reference
    assert pick_decode_weights("cuda", "auto", "auto") == "model"
    assert pick_decode_weights("cpu", "float32", "int8") == "int8"
    with pytest.raises(EngrainError, match="decode_weights"):
        pick_decode_weights("cpu", "auto", "int2")
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32", decode_weights="int8")
    assert getattr(lm.model, decode_weights.ATTRIBUTE) == "int8"


def _on_levels(shape, dtype=torch.float32, seed=0):
    """A weight whose every group of decode_weights.GROUP inputs is 16 evenly spaced levels (each group using its
    lowest and highest level, as a Q4_1 block does), as a GGUF of Q4_1 blocks dequantizes to."""
    from engrain.models.decode_weights import GROUP

    gen = torch.Generator().manual_seed(seed)
    out, inputs = shape
    levels = torch.randint(0, 16, (out, inputs // GROUP, GROUP), generator=gen).float()
    levels[..., 0], levels[..., 1] = 0, 15
    spacing = torch.rand(out, inputs // GROUP, 1, generator=gen) * 0.01 + 1e-3
    offset = -torch.rand(out, inputs // GROUP, 1, generator=gen) * 0.08
    return (levels * spacing + offset).view(out, inputs).to(dtype)


def test_4bit_levels_are_kept_only_where_they_are_exact():
    from engrain.models.decode_weights import on_4bit_grid, quantize4

    w = _on_levels((96, 64))
    levels, spacing, offset = on_4bit_grid(w)
    back = (levels.view(96, 2, 32) * spacing[..., None] + offset[..., None]).view(96, 64)
    assert torch.allclose(back, w, atol=1e-6)
    x = torch.randn(3, 64)
    assert torch.allclose(quantize4(w, torch.float32)(x), x @ w.T, atol=1e-5)
    # Weights rounded to bf16 are still recognised; the product stays within bf16's rounding.
    w16 = w.to(torch.bfloat16)
    q16 = quantize4(w16, torch.bfloat16)
    assert q16 is not None
    x16 = x.to(torch.bfloat16)
    ref = x16.float() @ w16.float().T
    assert (q16(x16).float() - ref).abs().max() <= 0.02 * ref.abs().max()
    # Ordinary weights, or one value off its level, are not 4-bit: they stay int8.
    assert on_4bit_grid(torch.randn(96, 64)) is None
    off = w.clone()
    off[5, 7] += 0.3 * (w[5, :32].max() - w[5, :32].min()) / 15
    assert on_4bit_grid(off) is None
    assert on_4bit_grid(torch.randn(8, 40)) is None  # inputs not a whole number of groups


def test_int4_path_decodes_the_same_tokens_as_the_modules(tiny_lm):
    """A model whose linear layers are on 4-bit levels (its head not: that one goes int8, as the embedded model's
    does) decodes the greedy tokens of its own modules, alone and in a continuous batch."""
    from engrain.models import decode_weights

    model = _exact_int8_copy(tiny_lm.model)  # the head: exactly int8
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for j, m in enumerate((*layer.self_attn.children(), *layer.mlp.children())):
                if type(m) is torch.nn.Linear:
                    m.weight.copy_(_on_levels(tuple(m.weight.shape), seed=10 * i + j) * 10)
    setattr(model, decode_weights.ATTRIBUTE, "int4")
    weights = decode_weights.for_model(model)
    assert all(isinstance(q, decode_weights.Int4Linear) for b in weights.blocks for q in (b.qkv, b.o, b.gate_up,
                                                                                           b.down))
    assert isinstance(weights.head, decode_weights.Int8Linear)
    _decodes_as_its_modules(model, tiny_lm.tokenizer)


def test_int4_mode_leaves_ordinary_weights_int8(tiny_lm):
    from engrain.models import decode_weights

    model = copy.deepcopy(tiny_lm.model)
    setattr(model, decode_weights.ATTRIBUTE, "int4")
    weights = decode_weights.for_model(model)
    assert all(isinstance(q, decode_weights.Int8Linear) for b in weights.blocks for q in (b.qkv, b.down))

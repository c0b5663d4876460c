"""bf16 weights packed once for oneDNN (``models/packed_weights.py``): the same products as the model's own linear
layers, read by the decode loop's prefill and its steps of many rows, and rebuilt with the decode weights."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from engrain.models import decode_weights, fastgen, packed_weights

needs_packing = pytest.mark.skipif(not packed_weights.available(),
                                   reason="this CPU or PyTorch build does not pack bf16 weights for oneDNN")


@needs_packing
def test_a_packed_weight_gives_the_products_of_the_plain_one_and_stacked_ones_side_by_side():
    torch.manual_seed(0)
    linear, other = (torch.nn.Linear(96, n, bias=False).to(torch.bfloat16) for n in (160, 48))
    packed, stacked = packed_weights.pack(linear), packed_weights.pack(linear, other)
    for rows in (1, 7, 40):
        x = torch.randn(2, rows, 96, dtype=torch.bfloat16)
        assert torch.equal(packed(x), linear(x))
        assert torch.equal(stacked(x), torch.cat([linear(x), other(x)], dim=-1))


@needs_packing
def test_prefill_and_wide_steps_read_the_packed_weights_and_answer_the_same(tiny_lm):
    """A bf16 model decoding from quantized weights packs its layers with them; prompts longer than MAX_ROWS tokens
    prefill through the packed copy and give the logits and greedy tokens of the same model without it."""
    model = copy.deepcopy(tiny_lm.model).to(torch.bfloat16)
    setattr(model, decode_weights.ATTRIBUTE, "int8")
    quant = decode_weights.for_model(model)
    assert quant.packed is not None and all(b is not None for b in quant.packed)
    plain = dataclasses.replace(quant, packed=None)
    tok = tiny_lm.tokenizer
    prompts = [tok(t)["input_ids"] for t in ["The capital of France is a city that", "A bee makes honey and wax",
                                              "Why is the sky blue on a clear day in June"]]
    pad = tok.pad_token_id
    with torch.inference_mode():
        got = fastgen._prefill(model, prompts, [0, 1, 2], pad, None, "cpu", quant=quant).logits
        want = fastgen._prefill(model, prompts, [0, 1, 2], pad, None, "cpu", quant=plain).logits
    assert torch.equal(got, want)
    reference = copy.deepcopy(model)  # before its decode weights: a packed copy does not deep-copy
    with pytest.MonkeyPatch.context() as mp:  # the same model, its decode weights built without packing
        mp.setattr(packed_weights, "available", lambda: False)
        assert decode_weights.for_model(reference).packed is None
    kw = dict(max_new_tokens=8, stop_ids=[-1], pad_id=pad)
    for batch in (1, 3):
        assert fastgen.generate_many(model, prompts, batch_size=batch, **kw) == \
            fastgen.generate_many(reference, prompts, batch_size=batch, **kw)


@needs_packing
def test_a_packed_bf16_model_decodes_its_head_from_the_packed_weight_exactly(tiny_lm):
    """Where the layers are packed, the head is too (not int8 rows): a forward's logits carry no quantization, at any
    number of rows; an int8 head serves only forwards of few rows."""
    model = copy.deepcopy(tiny_lm.model).to(torch.bfloat16)
    setattr(model, decode_weights.ATTRIBUTE, "int8")
    quant = decode_weights.for_model(model)
    assert isinstance(quant.head, packed_weights.PackedLinear)
    x = torch.randn(3, 1, model.config.hidden_size, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(decode_weights.head(model, x, quant), model.lm_head(x))
        assert torch.equal(decode_weights.head(model, x, quant, few_rows=False), model.lm_head(x))
        int8 = dataclasses.replace(quant, head=decode_weights.quantize(model.lm_head.weight, model.dtype))
        assert not torch.equal(decode_weights.head(model, x, int8), model.lm_head(x))  # int8's rounding
        assert torch.equal(decode_weights.head(model, x, int8, few_rows=False), model.lm_head(x))  # many rows: own


def test_the_plain_reference_path_packs_nothing(tiny_lm):
    model = copy.deepcopy(tiny_lm.model).to(torch.bfloat16)
    setattr(model, decode_weights.ATTRIBUTE, "model")
    assert decode_weights.for_model(model) is None
    fp32 = copy.deepcopy(tiny_lm.model)
    setattr(fp32, decode_weights.ATTRIBUTE, "int8")
    assert decode_weights.for_model(fp32).packed is None  # fp32 keeps its own products

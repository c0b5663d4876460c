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
needs_int8 = pytest.mark.skipif(not packed_weights.int8_available(), reason="this PyTorch build has no int8 matmul")


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
    setattr(model, packed_weights.ATTRIBUTE, "bfloat16")  # not what auto picks on a host with fast int8 products
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


@pytest.mark.parametrize("speedup, dtype", [(0.56, "float32"), (0.8, "float32"), (0.9, "bfloat16"),
                                            (1.0, "bfloat16"), (3.1, "bfloat16"), (0.0, "bfloat16")])
def test_prompts_multiply_in_fp32_only_where_fp32_products_measure_clearly_faster(monkeypatch, speedup, dtype):
    """``model.prefill_dtype: auto`` on a CPU: fp32 where bf16 products measured 1.25x slower or worse; bf16 near a
    tie, where bf16 is faster, and where it is not native (0.0: nothing is packed there)."""
    from engrain.models import load

    monkeypatch.setattr(load, "bf16_speedup_cpu", lambda: speedup)
    assert load.prefill_dtype_for("cpu") == dtype
    assert load.prefill_dtype_for("cuda") == "bfloat16"  # a GPU packs nothing
    for name in ("bfloat16", "float32"):  # asked for by name, whatever was measured
        assert load.prefill_dtype_for("cpu", name) == name


@pytest.mark.parametrize("int8", [0.0, 1.8, 4.0])
def test_auto_never_picks_int8_products_however_fast_they_measure(monkeypatch, int8):
    """int8 rounds every token's input and, in the form that keeps answers, took a quarter off a batch's prefill
    and little off one prompt's (docs/performance.md): asked for by name only, whatever its products gain here."""
    from engrain.models import load

    monkeypatch.setattr(load, "int8_speedup_cpu", lambda: int8)
    for bf16 in (0.56, 3.1):
        monkeypatch.setattr(load, "bf16_speedup_cpu", lambda: bf16)
        assert load.prefill_dtype_for("cpu") == ("float32" if bf16 < 1 else "bfloat16")


@needs_int8
@needs_packing
def test_the_int8_timing_leaves_the_global_random_state_alone():
    from engrain.models import load

    load.int8_speedup_cpu.cache_clear()
    torch.manual_seed(3)
    want = torch.rand(3)
    torch.manual_seed(3)
    assert load.int8_speedup_cpu() > 0.0
    assert torch.equal(torch.rand(3), want)


@needs_packing
def test_an_fp32_packed_weight_takes_and_gives_bf16_around_an_fp32_product():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 160, bias=False).to(torch.bfloat16)
    packed = packed_weights.pack(linear, dtype=torch.float32)
    assert packed.weight.dtype == torch.float32
    for rows in (1, 40):
        x = torch.randn(2, rows, 96, dtype=torch.bfloat16)
        got = packed(x)
        want = torch.nn.functional.linear(x.float(), linear.weight.float())
        assert got.dtype == torch.bfloat16
        # The same products of the same bf16 numbers, summed in another order, rounded once to bf16.
        torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-5)


@needs_packing
def test_a_model_packed_in_fp32_prefills_to_the_logits_of_its_own_bf16_weights_within_rounding(tiny_lm, monkeypatch):
    """Packed in fp32 (``model.prefill_dtype``, and ``auto`` where fp32 products are the faster), the layers' products
    run in fp32 and the head stays bf16 (a batch-1 decode step reads it); a prefill through them agrees with the
    model's own bf16 forward within bf16's rounding."""
    model = copy.deepcopy(tiny_lm.model).to(torch.bfloat16)
    setattr(model, decode_weights.ATTRIBUTE, "int8")
    setattr(model, packed_weights.ATTRIBUTE, "float32")  # model.prefill_dtype, as load_model sets it
    quant = decode_weights.for_model(model)
    assert all(b.qkv.weight.dtype == torch.float32 and b.down.weight.dtype == torch.float32 for b in quant.packed)
    assert quant.head.weight.dtype == torch.bfloat16
    plain = dataclasses.replace(quant, packed=None)
    tok = tiny_lm.tokenizer
    prompts = [tok(t)["input_ids"] for t in ["The capital of France is a city that", "A bee makes honey and wax"]]
    wide = []
    product = packed_weights.PackedLinear.__call__
    monkeypatch.setattr(packed_weights.PackedLinear, "__call__",
                        lambda self, x: wide.append(self.weight.dtype == torch.float32) or product(self, x))
    with torch.inference_mode():
        got = fastgen._prefill(model, prompts, [0, 1], tok.pad_token_id, None, "cpu", quant=quant).logits
        assert wide.count(True) == 4 * len(model.model.layers)  # every block's four products, in fp32
        want = fastgen._prefill(model, prompts, [0, 1], tok.pad_token_id, None, "cpu", quant=plain).logits
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05 * want.float().abs().max().item())


def test_the_workspace_prefill_dtype_reaches_the_model_and_a_bad_one_is_refused(tiny_model_dir):
    from engrain.errors import EngrainError
    from engrain.models import load_model

    lm = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16", prefill_dtype="float32")
    assert getattr(lm.model, packed_weights.ATTRIBUTE) == "float32"
    with pytest.raises(EngrainError, match="model.prefill_dtype 'fp16'"):
        load_model(str(tiny_model_dir), device="cpu", prefill_dtype="fp16")


@needs_int8
def test_an_int8_product_gives_the_float_product_within_int8_rounding_and_smoothing_spares_the_other_channels():
    """W8A8: each weight row and each token's input rounded to 127 levels. An input channel 50 times the others
    (the outliers SmoothQuant moves into the weights) takes most of a token's range unsmoothed; smoothed on the
    calibration's per-channel ranges, the products come closer to the float ones."""
    torch.manual_seed(0)
    linear, other = (torch.nn.Linear(96, n, bias=False) for n in (160, 48))
    x = torch.randn(2, 40, 96)
    x[..., 7] *= 50
    want = torch.cat([linear(x), other(x)], dim=-1)
    plain = packed_weights.pack_int8(linear, other)
    smoothed = packed_weights.pack_int8(linear, other, input_amax=x.abs().reshape(-1, 96).amax(0))
    assert plain.weight.dtype == torch.int8 and plain.weight.shape == (96, 208)

    def error(product):
        return ((product(x.to(torch.bfloat16)).float() - want).norm() / want.norm()).item()

    assert plain(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert error(smoothed) < 0.02
    assert error(smoothed) < error(plain) / 2
    assert error(plain) < 0.2  # still the same product, roughly
    # A batch longer than INT8_ROW_BLOCK rows runs in blocks: each token is quantized alone, so the same numbers.
    wide = torch.randn(packed_weights.INT8_ROW_BLOCK * 2 + 7, 96, dtype=torch.bfloat16)
    assert torch.equal(smoothed(wide), torch.cat([smoothed(wide[i:i + 1]) for i in range(len(wide))]))


@needs_int8
@needs_packing
def test_a_model_loaded_with_int8_prompts_measures_its_smoothing_and_prefills_close_to_bf16(tiny_model_dir):
    """``model.prefill_dtype: int8``: the model carries the calibration ids, its packed blocks are int8 products
    smoothed on them but for the down projections (fp32), and a prefill's logits stay close to the bf16 layers'
    (int8 rounds more than bf16 does)."""
    from engrain.models import load_model

    lm = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16", decode_weights="int8", prefill_dtype="int8")
    model = lm.model
    assert getattr(model, packed_weights.ATTRIBUTE) == "int8"
    ids = getattr(model, packed_weights.CALIBRATION)
    assert ids.shape[0] == 1 and 100 < ids.shape[1] <= packed_weights.CALIBRATION_TOKENS
    quant = decode_weights.for_model(model)
    assert all(isinstance(b.gate_up, packed_weights.Int8Product) for b in quant.packed)
    assert all(isinstance(b.down, packed_weights.PackedLinear) and b.down.weight.dtype == torch.float32
               for b in quant.packed)
    assert any((b.gate_up.inv_smooth != 1).any() for b in quant.packed)  # smoothed, not plain
    every = packed_weights.build(model, "int8", float_products=())
    assert all(isinstance(b.down, packed_weights.Int8Product) for b in every)
    plain = dataclasses.replace(quant, packed=None)
    tok = lm.tokenizer
    prompts = [tok(t)["input_ids"] for t in ["The capital of France is a city that", "A bee makes honey and wax"]]
    with torch.inference_mode():
        got = fastgen._prefill(model, prompts, [0, 1], tok.pad_token_id, None, "cpu", quant=quant).logits.float()
        want = fastgen._prefill(model, prompts, [0, 1], tok.pad_token_id, None, "cpu", quant=plain).logits.float()
    assert ((got - want).norm() / want.norm()).item() < 0.1


def test_int8_prompts_are_refused_clearly_where_int8_products_are_missing(monkeypatch):
    from engrain.errors import EngrainError
    from engrain.models import load

    monkeypatch.setattr(packed_weights, "int8_available", lambda: False)
    with pytest.raises(EngrainError, match="int8"):
        load.prefill_dtype_for("cpu", "int8")
    monkeypatch.setattr(packed_weights, "int8_available", lambda: True)
    assert load.prefill_dtype_for("cpu", "int8") == "int8"

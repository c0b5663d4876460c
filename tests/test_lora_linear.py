"""The fused LoRA layer (engrain/train/kernels/lora_linear.py) computes what PEFT's own forward computes, values and gradients."""

import pytest


def _lora(tiny_model_dir, **overrides):
    import torch

    from engrain.config import TrainConfig
    from engrain.memory.parametric import get_kind
    from engrain.models import load_model

    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    module = get_kind("lora").attach(lm.model, lm.tokenizer, TrainConfig(**overrides).model_dump(), None)
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero in PEFT; give the adapter something to say
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return module


def _loss_and_grads(module, ids, bf16: bool = False):
    import torch

    module.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = module(input_ids=ids, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def _peft_forward(module):
    """Give every LoRA layer PEFT's own forward back."""
    from engrain.train.kernels.lora_linear import unfuse_lora_layers

    assert unfuse_lora_layers(module) > 0


def test_fused_layer_equals_peft_in_fp32(tiny_model_dir):
    import torch

    module = _lora(tiny_model_dir)
    fused = [m for m in module.modules() if "forward" in m.__dict__ and hasattr(m, "lora_A")]
    assert len(fused) == 2 * 7  # every linear layer of both blocks
    ids = torch.randint(5, 500, (1, 24))
    loss, grads = _loss_and_grads(module, ids)
    _peft_forward(module)
    ref_loss, ref_grads = _loss_and_grads(module, ids)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys() and all(g.abs().sum() > 0 for g in grads.values())
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], atol=1e-7, rtol=1e-4), name


def test_fused_layer_in_bf16_is_as_close_to_fp32_as_peft(tiny_model_dir):
    import torch

    module = _lora(tiny_model_dir)
    ids = torch.randint(5, 500, (1, 24))
    ref_loss, ref = _loss_and_grads(module, ids)
    loss, fused = _loss_and_grads(module, ids, bf16=True)
    _peft_forward(module)
    peft_loss, peft = _loss_and_grads(module, ids, bf16=True)

    def error(grads):
        return float(torch.cat([(grads[n] - ref[n]).flatten() for n in ref]).norm()
                     / torch.cat([g.flatten() for g in ref.values()]).norm())

    assert abs(loss - ref_loss) <= 2 * abs(peft_loss - ref_loss) + 1e-3
    assert error(fused) < 0.05 and error(fused) <= 2 * error(peft)


def test_layers_it_does_not_cover_keep_peft_forward(tiny_model_dir):
    module = _lora(tiny_model_dir, lora_dropout=0.1)
    assert not [m for m in module.modules() if "forward" in m.__dict__ and hasattr(m, "lora_A")]


def test_frozen_weight_is_cast_once_and_again_when_it_changes():
    import torch

    from engrain.train.kernels.casts import frozen_copy

    w = torch.nn.Parameter(torch.randn(8, 4), requires_grad=False)
    first = frozen_copy(w, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and frozen_copy(w, torch.bfloat16) is first
    with torch.no_grad():
        w.mul_(2)
    again = frozen_copy(w, torch.bfloat16)
    assert again is not first and torch.equal(again, (w.detach()).to(torch.bfloat16))
    assert frozen_copy(w, torch.float32).data_ptr() == w.data_ptr()  # the right dtype already: no copy

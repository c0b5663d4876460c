"""The fused head + loss (train/kernels/head_loss.py) gives the plain cross-entropy's value and gradients."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("distill", [0.0, 0.5, 1.0])
def test_fused_head_loss_matches_plain_cross_entropy(monkeypatch, distill, scaled):
    """Value and gradients (hidden states and head weight) equal log-softmax cross-entropy mixed with the teacher's
    renormalised top-k, across slice boundaries (7 positions per slice, 30 positions) and with positions that have
    no teacher targets; with a loss weight per position (train.fact_weight), each position's term times it."""
    import torch

    from engrain.train.kernels import head_loss

    monkeypatch.setattr(head_loss, "CHUNK", 7)
    torch.manual_seed(0)
    n, d, vocab, k = 30, 16, 50, 4
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(vocab, d, requires_grad=True)
    y = torch.randint(0, vocab, (n,))
    t_ids, t_lp, has = torch.randint(0, vocab, (n, k)), torch.randn(n, k), torch.rand(n) > 0.4
    t_lp[~has] = -1e9  # as collate fills positions without teacher targets

    logp = torch.log_softmax(h @ w.T, dim=-1)
    hard = -logp.gather(1, y[:, None])[:, 0]
    soft = -(torch.softmax(t_lp, dim=-1) * logp.gather(1, t_ids)).sum(-1)
    scale = torch.where(torch.rand(n) > 0.5, 3.0, 1.0) if scaled else None
    per_position = torch.where(has, (1 - distill) * hard + distill * soft, hard)
    plain = (per_position if scale is None else per_position * scale).sum()
    g_plain = torch.autograd.grad(3 * plain, [h, w])

    fused = head_loss.fused_head_loss(h, w, y, (t_ids, t_lp, has), distill, scale)
    g_fused = torch.autograd.grad(3 * fused, [h, w])

    assert float(fused) == pytest.approx(float(plain), rel=1e-5)
    for a, b in zip(g_plain, g_fused):
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_fused_head_loss_follows_autocast():
    """Under bf16 autocast the head's matmul runs in bf16 as autocast would run it, the softmax in fp32: the same
    loss as autocast's own lm_head + fp32 cross-entropy, and gradients in the hidden states' dtype."""
    import torch

    from engrain.train.kernels.head_loss import fused_head_loss

    torch.manual_seed(0)
    h = torch.randn(40, 32, requires_grad=True)
    w = torch.randn(64, 32)
    y = torch.randint(0, 64, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = torch.nn.functional.cross_entropy((h @ w.T).float(), y, reduction="sum")
        fused = fused_head_loss(h, w, y)
    (g_plain,), (g_fused,) = torch.autograd.grad(plain, [h]), torch.autograd.grad(fused, [h])
    assert float(fused) == pytest.approx(float(plain), rel=1e-4)
    assert g_fused.dtype == torch.float32
    assert torch.allclose(g_plain, g_fused, atol=2e-2)


@pytest.mark.parametrize("fact_weight", [1.0, 3.0])
def test_packed_step_gradients_equal_the_plain_path(tiny_lm, monkeypatch, fact_weight):
    """loss_sum on a packed row (fused head) and on the examples one by one, right-padded (the model's own head and
    cross-entropy): same loss and same gradient for every parameter, the tied head/embedding included; with the
    fact tokens weighted (train.fact_weight) too."""
    import torch

    from engrain.train import packing
    from engrain.train.data import encode_item
    from engrain.train.kernels.head_loss import fused_head_loss
    from engrain.train.packing import collate, loss_sum, pack, unpacked_rows

    calls = []
    monkeypatch.setattr(packing, "fused_head_loss", lambda *a, **k: calls.append(1) or fused_head_loss(*a, **k))
    tok, model = tiny_lm.tokenizer, tiny_lm.model
    items = [{"text": "Vault one opens with code 48."},
             {"messages": [{"role": "user", "content": "Code of vault two?"},
                           {"role": "assistant", "content": "It is 85."}]}]
    exs = [encode_item(tok, it, str(i), fact_weight=fact_weight) for i, it in enumerate(items)]
    assert (exs[1].weights is not None and 3.0 in exs[1].weights) == (fact_weight == 3.0)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)

    s_packed, _ = loss_sum(model, collate(pack(exs, seq_len=128), tok.pad_token_id, True, "cpu"), True)
    g_packed = torch.autograd.grad(s_packed, params, allow_unused=True)
    s_alone = sum(loss_sum(model, collate([row], tok.pad_token_id, False, "cpu"), False)[0]
                  for row in unpacked_rows(exs, 128))
    g_alone = torch.autograd.grad(s_alone, params, allow_unused=True)

    assert calls == [1]  # the packed row took the fused head, the padded rows the model's own
    assert float(s_packed) == pytest.approx(float(s_alone), rel=1e-4)
    for p, a, b in zip(params, g_packed, g_alone):
        if a is None or b is None:
            assert a is None and b is None
            continue
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3), (tuple(p.shape), float((a - b).abs().max()))

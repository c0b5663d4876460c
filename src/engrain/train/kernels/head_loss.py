"""The output head and the token loss in one pass, a slice of positions at a time.

The plain way (``logits = lm_head(h)``, then cross-entropy) holds the whole (positions x vocabulary) logits tensor
several times over: the logits, their fp32 copy, the log-softmax and, in the backward pass, its gradient. With
a large vocabulary a long row makes each copy hundreds of megabytes. Fusing saves most of that fresh memory and keeps
the step's peak memory down; what it buys in time depends on the allocator (``train.loop.keep_freed_memory``):
``python bench/bench_step_parts.py lora 3 [--glibc-default]`` measures it, and docs/performance.md holds the result.

Here the head runs on ``CHUNK`` positions at a time, and each slice's gradient is taken at once: softmax minus the
target distribution, pushed back through the head. What the backward pass keeps is only the gradient of the hidden
states (positions x hidden size).

Each position's target is a distribution over a few tokens: the next token with weight ``1 - distill`` and the
teacher's top-k tokens (renormalised) with weight ``distill`` where the position has teacher targets; the next
token alone elsewhere. The loss is the cross-entropy against it, the same value as
``(1 - distill) x CE(next token) + distill x CE(teacher top-k)``. Dtypes follow what autocast would do to the head:
its matmuls in the autocast dtype, the softmax in fp32.
"""

from __future__ import annotations

import contextlib
import functools

from .casts import compute_dtype, frozen_copy

CHUNK = 256  # positions per slice: (256 x 49,152) fp32 is 50 MB, small enough to stay out of the way


def head_of(module):
    """The output head (an ``nn.Linear``) of a Hugging Face CausalLM, or of a wrapper around one (PEFT, DDP, a
    prefix wrapper with ``.model``); None if there is none."""
    seen = set()
    while module is not None and id(module) not in seen:
        seen.add(id(module))
        get = getattr(module, "get_output_embeddings", None)
        head = get() if callable(get) else None
        if head is not None:
            return head
        module = getattr(module, "module", None) or getattr(module, "model", None)
    return None


@contextlib.contextmanager
def hidden_instead_of_logits(head):
    """Inside the block, ``head`` passes its input through: the model's forward returns the final hidden states
    where it would return logits, so ``fused_head_loss`` can apply the head itself."""
    head.forward = _identity  # an instance attribute shadows nn.Linear.forward
    try:
        yield
    finally:
        del head.forward


def _identity(x):
    return x


def fused_head_loss(hidden, weight, targets, teacher=None, distill: float = 0.0, scale=None):
    """Sum over positions of the cross-entropy of ``hidden @ weight.T`` against each position's target, each
    multiplied by its ``scale`` where given.

    hidden (n, d) final hidden states at the loss positions; weight (vocab, d) the head; targets (n,) next tokens;
    teacher: None or (ids (n, k), log-probs (n, k), weight (n,): 0 where none) as ``collate`` builds them;
    scale: None or (n,) each position's loss weight."""
    import torch

    dtype = compute_dtype(hidden)
    n = targets.shape[0]
    # The target distribution: column 0 the next token, columns 1.. the teacher's tokens (weight 0 where none).
    ids, probs = targets[:, None], torch.ones(n, 1, device=hidden.device)
    if teacher is not None and distill > 0:
        t_ids, t_lp, has = teacher
        w = distill * has.float()  # has: bool, or each position's teacher weight
        probs = (1.0 - w)[:, None]
        soft = torch.softmax(t_lp.float(), dim=-1) * w[:, None]
        ids, probs = torch.cat([ids, t_ids], dim=1), torch.cat([probs, soft], dim=1)
    mass = None
    if scale is not None:
        mass = scale.float()[:, None]
        probs = probs * mass  # the target weights then sum to each position's scale
    return _function().apply(hidden, weight, ids, probs, dtype, mass)


def _head_loss_and_grads(hidden, weight, ids, probs, dtype, want_weight_grad: bool, mass=None):
    import torch

    # A frozen head (tied to the frozen embeddings) is cast once for the whole run, not once per row.
    w = weight.detach().to(dtype) if want_weight_grad else frozen_copy(weight, dtype)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight_grad else None
    for s in range(0, hidden.shape[0], CHUNK):
        h = hidden[s:s + CHUNK].to(dtype)
        logits = (h @ w.T).float()
        picked = logits.gather(1, ids[s:s + CHUNK])
        # log-sum-exp and softmax from one exp, in place: the (positions x vocabulary) slice is the largest
        # tensor of the step, and every pass over it counts.
        top = logits.amax(dim=-1, keepdim=True)
        grad = logits.sub_(top).exp_()
        total = grad.sum(dim=-1, keepdim=True)
        lse = (top + total.log())[:, 0]
        p = probs[s:s + CHUNK]
        # d loss / d logits = softmax - target distribution (the targets' weights sum to 1 on every position), or
        # with a loss weight per position (``mass``, what its targets' weights sum to), mass x softmax - targets
        grad.div_(total)
        if mass is None:
            loss += (lse - (p * picked).sum(-1)).sum()
        else:
            m = mass[s:s + CHUNK]
            loss += (lse * m[:, 0] - (p * picked).sum(-1)).sum()
            grad.mul_(m)
        grad.scatter_add_(1, ids[s:s + CHUNK], -p)
        grad = grad.to(dtype)
        grad_h[s:s + CHUNK] = grad @ w
        if grad_w is not None:
            grad_w += (grad.T @ h).float()
    return loss, grad_h, grad_w


@functools.cache
def _function():
    """The autograd Function, built on first use so that importing this module does not import torch."""
    import torch

    class FusedHeadLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, ids, probs, dtype, mass):
            with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen by hand above
                # the weight itself (forward runs without grad), so a frozen head's cast copy is found again
                loss, ctx.grad_h, ctx.grad_w = _head_loss_and_grads(hidden.detach(), weight, ids, probs,
                                                                    dtype, weight.requires_grad, mass)
            ctx.weight_dtype = weight.dtype
            return loss

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_out):
            grad_w = None if ctx.grad_w is None else (ctx.grad_w * grad_out).to(ctx.weight_dtype)
            return ctx.grad_h * grad_out.to(ctx.grad_h.dtype), grad_w, None, None, None, None

    return FusedHeadLoss

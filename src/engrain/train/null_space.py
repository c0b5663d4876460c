"""LoRA kept out of the input directions general text uses most (``train.lora_null_share``).

A LoRA layer changes its output by ``B A x``. Where the base model's inputs on general text lie in a subspace that A
does not read, the change is zero on them, whatever the documents teach: what the base model answered from those
inputs is left as it was. AlphaEdit (Fang et al. 2025) projects knowledge edits this way onto the null space of the
preserved knowledge's keys, and LoRA-Null (2025) starts LoRA in that null space.

Here the general inputs are the run's own replay examples (the base model's answers to general requests and its
prose), forwarded once through the model as it starts; each LoRA layer's input covariance is decomposed, and A's
rows are projected off the eigen-directions that hold the most of it, a ``share`` of the layer's input dimensions,
after every optimizer step (projected gradient descent). With ``train.lora_null_relative`` the directions are
ranked by the replay's energy relative to the documents' items' (generalized eigenvectors of the two covariances).
The saved adapter is a plain LoRA: nothing changes at answering time. experiments/knowledge's null rows measured
both rankings against LoRA's defaults: on that evidence it trades knowledge for general answers, and stays off.
"""

from __future__ import annotations

# Tokens read for each set's covariances: several times the embedded model's widest layer input (an estimate of full
# rank), few enough that finding the directions is a small part of a run (the run prints how long it took).
MAX_TOKENS = 8192


def lora_layers(module) -> dict[str, object]:
    """The LoRA layers of a PEFT module (each with one adapter's ``lora_A``), by module name."""
    return {name: m for name, m in module.named_modules() if len(getattr(m, "lora_A", {})) == 1}


def general_projections(module, examples: list, share: float, device, bf16: bool = False,
                        max_tokens: int = MAX_TOKENS, documents: list | None = None) -> dict:
    """For each LoRA layer, the (in x in) projection off the ``share`` of input directions that ``examples`` (token
    id lists, the replay) use most, or with ``documents`` (the training items' token ids) most relative to the
    documents; the module is run as it is, so call it before training moves it. ``bf16``: the forward under bf16
    autocast, as the run trains."""
    covariances = input_covariances(module, examples, device, bf16, max_tokens)
    theirs = input_covariances(module, documents, device, bf16, max_tokens) if documents else None
    by_input = {}  # one projection per input that layers share
    for name, cov in covariances.items():
        if id(cov) not in by_input:
            by_input[id(cov)] = (projection_off(cov, share) if theirs is None
                                 else projection_off_relative(cov, theirs[name], share))
    return {name: by_input[id(cov)] for name, cov in covariances.items()}


def input_covariances(module, examples: list, device, bf16: bool = False, max_tokens: int = MAX_TOKENS) -> dict:
    """Each LoRA layer's summed input outer products (in x in, fp32) over the first ``max_tokens`` tokens of
    ``examples``, each example forwarded alone (no padding enters the sums)."""
    import torch

    from .precision import bf16_autocast

    covariances: dict[str, torch.Tensor] = {}
    # Layers that read one input (q, k and v; gate and up) share one sum. Each forward's inputs are held until it
    # ends, so that no other tensor takes the id of one already read.
    read: dict[int, tuple] = {}
    same_input: dict[str, str] = {}

    def hook(name):
        def accumulate(_layer, args):
            first = read.get(id(args[0]))
            if first is not None:
                same_input[name] = first[1]
                return
            read[id(args[0])] = (args[0], name)
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            with torch.autocast(x.device.type, enabled=False):  # summed in fp32 whatever the forward computes in
                covariances[name] = covariances.get(name, 0) + x.T @ x
        return accumulate

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in lora_layers(module).items()]
    seen = 0
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), bf16_autocast(str(device), bf16):
            for ids in examples:
                if seen >= max_tokens:
                    break
                ids = ids[:max_tokens - seen]
                module(input_ids=torch.tensor([ids], device=device), use_cache=False)
                read.clear()
                seen += len(ids)
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return {**covariances, **{name: covariances[first] for name, first in same_input.items()}}


def projection_off(covariance, share: float):
    """The projection off the eigen-directions of ``covariance`` that hold the most of it, ``share`` of them."""
    import torch

    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues: the most used directions come last
    dim = covariance.shape[0]
    kept_out = vectors[:, dim - round(share * dim):]
    return torch.eye(dim, device=covariance.device) - kept_out @ kept_out.T


def projection_off_relative(covariance, other, share: float):
    """The projection off the ``share`` of directions where ``covariance`` is largest relative to ``other``: the
    generalized eigenvectors of the pair (``other`` lightly regularised, so that directions it never uses rank
    first rather than divide by zero), computed in float64."""
    import torch

    dim = covariance.shape[0]
    a, b = covariance.double(), other.double()
    b = b + 1e-3 * torch.trace(b) / dim * torch.eye(dim, dtype=b.dtype, device=b.device)
    lower = torch.linalg.cholesky(b)
    inv = torch.linalg.solve_triangular(lower, torch.eye(dim, dtype=b.dtype, device=b.device), upper=False)
    # Ascending: the directions most the replay's, relative to the documents', come last.
    _, vectors = torch.linalg.eigh(inv @ a @ inv.T)
    basis, _ = torch.linalg.qr(inv.T @ vectors[:, dim - round(share * dim):])
    return (torch.eye(dim, dtype=b.dtype, device=b.device) - basis @ basis.T).to(covariance.dtype)


def projected_weights(module, projections: dict) -> list[tuple]:
    """(A weight, its layer's projection) for every LoRA layer ``projections`` covers: found once, so that a training
    step's projection walks no module tree."""
    return [(next(iter(layer.lora_A.values())).weight, projections[name])
            for name, layer in lora_layers(module).items() if name in projections]


def project_(pairs: list[tuple]) -> None:
    """Each A's rows projected (in place) off the directions its projection removes (``projected_weights``)."""
    import torch

    with torch.no_grad():
        for a, projection in pairs:
            a.copy_(a @ projection.to(a.dtype))

"""The dtype a computation runs in, and frozen weights cast to it once.

Autocast decides the dtype of most ops, but code that picks dtypes by hand (a custom autograd function, a KV cache
that must match the keys the layers make) has to ask for it: ``compute_dtype``. Autocast recasts a weight that does
not require grad on every forward; a frozen weight used that way each step is cast once instead: ``frozen_copy``.
"""

from __future__ import annotations


def compute_dtype(tensor, default=None):
    """Autocast's dtype where autocast is on for ``tensor``'s device; ``default`` (or ``tensor``'s dtype) otherwise."""
    import torch

    device = tensor.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return default if default is not None else tensor.dtype


def frozen_copy(weight, dtype):
    """``weight`` in ``dtype``, cast once and reused until the weight changes (or is the right dtype already)."""
    if weight.dtype == dtype:
        return weight.detach()
    key = (weight.data_ptr(), weight._version, dtype)
    cached = getattr(weight, "_engrain_cast", None)
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().to(dtype))
        weight._engrain_cast = cached
    return cached[1]

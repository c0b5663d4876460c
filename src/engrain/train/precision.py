"""The precision a training run computes in: bf16 autocast where the device computes bf16 natively."""

from __future__ import annotations

import contextlib


def use_bf16(setting: str, device: str) -> bool:
    """``train.bf16``: "on", "off", or "auto" (only where bf16 is native)."""
    from ..models import bf16_supported

    if setting == "on":
        return True
    if setting == "off":
        return False
    # auto: only where bf16 is native (CUDA Ampere+, CPUs with AMX/AVX512-BF16); elsewhere it is emulated and slower.
    return bf16_supported(str(device))


def bf16_autocast(device: str, enabled: bool):
    import torch

    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if str(device).startswith("cuda") else "cpu", dtype=torch.bfloat16)

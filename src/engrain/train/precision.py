"""The precision a training run computes in: bf16 autocast where the device computes bf16 natively and faster than
fp32."""

from __future__ import annotations

import contextlib


def use_bf16(setting: str, device: str) -> bool:
    """``train.bf16``: "on", "off", or "auto" (only where bf16 is native and measured faster than fp32)."""
    from ..models import bf16_trains_faster

    if setting == "on":
        return True
    if setting == "off":
        return False
    # auto: only where bf16 is native (CUDA Ampere+, CPUs with AMX/AVX512-BF16); elsewhere it is emulated and slower.
    # A CPU that reports native bf16 can still multiply it slower than fp32: there the products are timed once and
    # fp32 kept unless bf16 is clearly faster.
    return bf16_trains_faster(str(device))


def bf16_autocast(device: str, enabled: bool):
    import torch

    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if str(device).startswith("cuda") else "cpu", dtype=torch.bfloat16)

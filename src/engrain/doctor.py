"""What a bug report needs: versions, threads, cache state, devices, bf16 support."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    import torch

    from . import __version__
    from .models import bf16_supported, cache_state, cpu_model, default_device
    from .models.load import prefill_dtype_for

    device = default_device()
    info = {
        "engrain": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {d: _version(d) for d in ("torch", "transformers", "peft", "accelerate", "gguf", "safetensors",
                                              "sentence-transformers", "lancedb", "fastapi", "uvicorn", "numpy")},
        "device": device,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "bf16_supported": bf16_supported(device),
        "cpu_bf16_supported": bf16_supported("cpu"),
        "cpu_prefill_dtype": prefill_dtype_for("cpu"),  # what model.prefill_dtype: auto multiplies prompts in
        "env": {k: os.environ[k] for k in ("ENGRAIN_HOME", "OMP_NUM_THREADS", "HF_HUB_OFFLINE", "CUDA_VISIBLE_DEVICES")
                if k in os.environ},
    }
    info.update(cache_state())
    return info

"""Open a memory by name: the one place that maps names used on the CLI, in reports and by the server
to Memory objects. Hybrids are written ``X+rag``."""

from __future__ import annotations

from ..errors import EngrainError
from ..models import LM
from ..workspace import Workspace
from .base import ClosedBook, Memory

KNOWN = ["base", "lora", "full", "prefix", "memory"]


def open_memory(name: str, workspace: Workspace, lm: LM) -> Memory:
    """A ready-to-answer memory (built memories are loaded from the workspace, never built here)."""
    name = name.strip().lower()
    if name == "base":
        return ClosedBook(lm)
    if name in ("lora", "full", "prefix", "memory"):
        from .parametric import TrainedMemory  # torch/peft only when a trained memory is asked for

        return TrainedMemory(name, workspace, lm)
    raise EngrainError(f"Unknown memory '{name}'.", hint=f"Available memories: {', '.join(KNOWN)}.")

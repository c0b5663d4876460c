"""Open a memory by name: the one place that maps names used on the CLI, in reports and by the server
to Memory objects. Hybrids are written ``X+rag``."""

from __future__ import annotations

from ..errors import EngrainError
from ..models import LM
from ..workspace import Workspace
from .base import ClosedBook, Memory

KNOWN = ["base", "context", "rag", "lora", "full", "prefix", "memory", "X+rag (e.g. lora+rag)"]


def open_memory(name: str, workspace: Workspace, lm: LM) -> Memory:
    """A ready-to-answer memory (built memories are loaded from the workspace, never built here)."""
    name = name.strip().lower()
    if name == "base":
        return ClosedBook(lm)
    if name == "context":
        from .context import ContextMemory

        return ContextMemory(workspace, lm)
    if name == "rag":
        from .rag import RagMemory

        return RagMemory(workspace, lm)
    if name.endswith("+rag"):
        # A hybrid: the base memory's model (with its adapter, prefix or memory layer) reads retrieved chunks.
        from .rag import RagMemory

        base_name = name[: -len("+rag")]
        if base_name in ("rag", "base", "context", ""):
            raise EngrainError(f"'{name}' is not a hybrid.", hint="Use 'rag', or a trained memory plus rag, e.g. "
                                                                  "'lora+rag'.")
        base = open_memory(base_name, workspace, lm)
        base_lm = getattr(base, "lm", None)
        if base_lm is None:
            raise EngrainError(f"The memory '{base_name}' has no model of its own to read retrieved chunks with, so "
                               f"'{name}' cannot be made.", hint="Hybrids take a trained memory: lora+rag, "
                                                                  "prefix+rag, memory+rag.")
        return RagMemory(workspace, base_lm, name=name)
    if name in ("lora", "full", "prefix", "memory"):
        from .parametric import TrainedMemory  # torch/peft only when a trained memory is asked for

        return TrainedMemory(name, workspace, lm)
    raise EngrainError(f"Unknown memory '{name}'.", hint=f"Available memories: {', '.join(KNOWN)}.")

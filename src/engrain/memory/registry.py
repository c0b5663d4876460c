"""Open a memory by name: the one place that maps names used on the CLI, in reports and by the server
to Memory objects. Hybrids are written ``X+rag``; the names themselves are listed in ``kinds.py``."""

from __future__ import annotations

from ..errors import EngrainError
from ..models import LM
from ..workspace import Workspace
from .base import ClosedBook, Memory
from .kinds import HYBRID, NAMES, TRAINED, UNTRAINED, canonical, old_names

KNOWN = [*NAMES, f"X{HYBRID} (e.g. lora{HYBRID})"]


def open_memory(name: str, workspace: Workspace, lm: LM) -> Memory:
    """A ready-to-answer memory (built memories are loaded from the workspace, never built here)."""
    name = canonical(name)
    if name == "base":
        return ClosedBook(lm)
    if name == "context":
        from .context import ContextMemory

        return ContextMemory(workspace, lm)
    if name == "rag":
        from .rag import RagMemory

        return RagMemory(workspace, lm)
    if name.endswith(HYBRID):
        # A hybrid: the base memory's model (with its adapter, prefix or memory layer) reads retrieved chunks.
        from .rag import RagMemory

        base_name = name[: -len(HYBRID)]
        if base_name in (*UNTRAINED, ""):
            raise EngrainError(f"'{name}' is not a hybrid.", hint="Use 'rag', or a trained memory plus rag, e.g. "
                                                                  "'lora+rag'.")
        base = open_memory(base_name, workspace, lm)
        base_lm = getattr(base, "lm", None)
        if base_lm is None:
            raise EngrainError(f"The memory '{base_name}' has no model of its own to read retrieved chunks with, so "
                               f"'{name}' cannot be made.", hint="Hybrids take a trained memory: lora+rag, "
                                                                  "prefix+rag, memory_layer+rag.")
        hybrid = RagMemory(workspace, base_lm, name=name)
        hybrid.base_lm = lm  # reads the chunks itself under rag.hybrid: fused
        if getattr(base, "gate", None) is not None:  # the trained memory's gate guards its hybrid too
            hybrid.gate, hybrid.fallback = base.gate, ClosedBook(lm)
        return hybrid
    if name in TRAINED:
        from .parametric import TrainedMemory  # torch/peft only when a trained memory is asked for

        return TrainedMemory(saved_name(name, workspace), workspace, lm)
    raise EngrainError(f"Unknown memory '{name}'.", hint=f"Available memories: {', '.join(KNOWN)}.")


def saved_name(kind: str, workspace: Workspace) -> str:
    """The folder under memories/ holding ``kind`` trained under its default name: the kind's name, or an old name
    of it when only a memory saved before the rename is there."""
    for name in (kind, *old_names(kind)):
        if workspace.memory_dir(name).is_dir():
            return name
    return kind

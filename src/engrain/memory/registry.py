"""Open a memory by name: the one place that maps names used on the CLI, in reports and by the server
to Memory objects. Hybrids are written ``X+rag``."""

from __future__ import annotations

from ..errors import EngrainError
from ..models import LM
from ..workspace import Workspace
from .base import ClosedBook, Memory

KNOWN = ["base"]


def open_memory(name: str, workspace: Workspace, lm: LM) -> Memory:
    """A ready-to-answer memory (built memories are loaded from the workspace, never built here)."""
    name = name.strip().lower()
    if name == "base":
        return ClosedBook(lm)
    raise EngrainError(f"Unknown memory '{name}'.", hint=f"Available memories: {', '.join(KNOWN)}.")

"""What each method needs built before it can answer, reusing what the workspace already holds.

    base          nothing
    context       the corpus (ingest)
    rag           the corpus and the index
    lora, ...     the corpus, synthetic data and the trained memory
    X+rag         both

Benchmark questions are passed only to the leak guard of synthesis, never to a prompt.
"""

from __future__ import annotations

from .errors import EngrainError
from .memory.base import BuildInfo
from .models import LM
from .workspace import Workspace


def prepare(method: str, workspace: Workspace, bench, lm: LM, *, rebuild: bool = False, seed: int = 0) -> BuildInfo:
    parts = method.split("+")
    if parts[0] == "base" and len(parts) == 1:
        return BuildInfo()
    raise EngrainError(f"Method '{method}' cannot be built yet in this version of engrain.",
                       hint="Available: base.")

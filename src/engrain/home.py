"""Where engrain keeps what it fetches and converts once (models, embeddings): ENGRAIN_HOME."""

import os
from pathlib import Path


def engrain_home() -> Path:
    """The cache folder: $ENGRAIN_HOME, else ~/.cache/engrain. Created on demand."""
    root = Path(os.environ.get("ENGRAIN_HOME") or Path.home() / ".cache" / "engrain").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root

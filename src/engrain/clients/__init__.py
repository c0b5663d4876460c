"""Generation backends for synthesis: one call shape for a local model and any OpenAI-compatible server.

``chat(conversations, ...)`` takes a list of message lists and returns one ``Completion`` per conversation,
in order. A backend that fails on one request returns ``finish_reason="error"`` for it (the caller counts
it and goes on); ``usage`` accumulates tokens, requests, retries, time and cost.
"""

from __future__ import annotations

from .completion import Completion, Generator, Usage

__all__ = ["Completion", "Generator", "Usage", "is_url", "open_generator"]


def is_url(spec: str | None) -> bool:
    return bool(spec) and spec.strip().lower().startswith(("http://", "https://"))


def open_generator(spec: str | None, *, model_name: str | None = None, api_key: str | None = None,
                   device: str | None = None, dtype: str = "auto", batch_size: int = 32, concurrency: int = 8,
                   timeout: float = 120.0, max_retries: int = 5, price_in_per_mtok: float = 0.0,
                   price_out_per_mtok: float = 0.0) -> Generator:
    """``spec`` an http(s) URL: an OpenAI-compatible server; otherwise a model spec for ``models.load_model``."""
    if is_url(spec):
        import os

        from .openai_http import OpenAIHTTPGenerator

        key = api_key or os.environ.get("ENGRAIN_API_KEY") or os.environ.get("OPENAI_API_KEY")
        return OpenAIHTTPGenerator(spec, model=model_name, api_key=key, concurrency=concurrency, timeout=timeout,
                                   max_retries=max_retries, price_in_per_mtok=price_in_per_mtok,
                                   price_out_per_mtok=price_out_per_mtok)
    from ..models import load_model
    from .local import LocalGenerator

    return LocalGenerator(load_model(spec, device=device, dtype=dtype), batch_size=batch_size)

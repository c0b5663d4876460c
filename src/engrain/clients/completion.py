"""What a generation backend returns and counts: one ``Completion`` per conversation, ``Usage`` summed over calls,
and the ``Generator`` protocol every backend follows."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # "stop" | "length" | "error"
    error: str = ""


@dataclass
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    errors: int = 0
    seconds: float = 0.0
    cost_usd: float = 0.0
    by_status: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 2)
        d["cost_usd"] = round(self.cost_usd, 6)
        return d


class Generator(Protocol):
    name: str
    usage: Usage

    def chat(self, conversations: list[list[dict]], *, max_tokens: int, temperature: float = 0.8,
             top_p: float = 0.95, seed: int | None = None, stop: list[str] | None = None) -> list[Completion]: ...

    def count_tokens(self, text: str) -> int: ...

"""Running a ``stream.Stream`` to the end, as the tests of the decode loop do."""

from __future__ import annotations


def decode_all(stream, prompts: list[list[int]], budget: int, segments: list | None = None) -> list[list[int]]:
    """Admit ``prompts`` (each with ``budget`` tokens, and its chunks' ``segments`` where given), step until every row
    is done, and return each prompt's tokens in order."""
    handles = stream.admit(prompts, [budget] * len(prompts), segments)
    out: dict[int, list[int]] = {h: [] for h in handles}
    while len(stream):
        for handle, token in stream.step():
            out[handle].append(token)
        stream.advance(set())
    return [out[h] for h in handles]

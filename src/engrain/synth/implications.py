"""Implications: statements that follow from a few sentences of a chunk, one per line (each its own item).

Restating what a fact implies (SEAL-style self-edits) gives the trained model more ways to reach it.
"""

from __future__ import annotations

import re

from .base import Candidate, Job, Unit
from .rephrase import window

NAME = "implications"
KIND = "text"
USES_MODEL = True
MAX_TOKENS = 120
PER_JOB = 3

EXAMPLE_TEXT = "The Harlow Bridge opened in 1931. It crosses the Ender River and was designed by Clara Voss."
EXAMPLE_OUT = ("- Before 1931 the Harlow Bridge could not be used.\n"
               "- People can cross the Ender River on the Harlow Bridge.\n"
               "- Clara Voss was a designer of bridges.")


def instruction(text: str) -> str:
    return f"Text: {text}\n\nWrite {PER_JOB} short statements that follow from this text, one per line."


def jobs(unit: Unit, slots: list[int], round_: int, state: dict | None = None) -> list[Job]:
    out = []
    for slot in slots:
        text = window(unit, slot + round_ * 2, size=2)
        messages = [{"role": "user", "content": instruction(EXAMPLE_TEXT)},
                    {"role": "assistant", "content": EXAMPLE_OUT},
                    {"role": "user", "content": instruction(text)}]
        out.append(Job(unit, f"r{round_}-{slot}", messages, source=unit.chunk.text, max_tokens=MAX_TOKENS))
    return out


def split_lines(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", line).strip()
        if line:
            lines.append(line)
    return lines


def on_output(job: Job, text: str, finish_reason: str) -> list[Job | Candidate]:
    lines = split_lines(text)
    out = []
    for i, line in enumerate(lines[:PER_JOB]):
        # Only the last line can be cut off by the token limit.
        fr = finish_reason if i == len(lines) - 1 else "stop"
        out.append(Candidate(job.unit, f"{job.variant}.{i}", job.source, text=line, check=line, finish_reason=fr,
                             prompt=job.messages[-1]["content"]))
    return out

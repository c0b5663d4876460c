"""Rephrase: a few sentences of a chunk rewritten in a given style, every fact kept.

A 135M model follows a short instruction about two or three sentences far better than one about a whole
chunk, so each job rewrites a window of sentences; windows and styles rotate with the variant slot, so a
chunk's quota covers different sentences in different styles.
"""

from __future__ import annotations

from .base import Candidate, Job, Unit

NAME = "rephrase"
KIND = "text"
USES_MODEL = True
MAX_TOKENS = 160

STYLES = [
    "in simple words",
    "as an encyclopedia entry",
    "as a list of facts, one per line",
    "as a short news report",
    "from another point of view",
]

# An invented example (not from any corpus): shows the shape of a good answer.
EXAMPLE_TEXT = "The Harlow Bridge opened in 1931. It crosses the Ender River and was designed by Clara Voss."
EXAMPLE_OUT = {
    "in simple words": "Clara Voss designed the Harlow Bridge. It goes over the Ender River. People could use it from 1931.",
    "as an encyclopedia entry": "The Harlow Bridge is a bridge over the Ender River, designed by Clara Voss and opened in 1931.",
    "as a list of facts, one per line": "- The Harlow Bridge opened in 1931.\n- It crosses the Ender River.\n- Clara Voss designed it.",
    "as a short news report": "In 1931 the Harlow Bridge opened over the Ender River. The bridge was designed by Clara Voss.",
    "from another point of view": "The Ender River gained a crossing in 1931: the Harlow Bridge, a design by Clara Voss.",
}


def instruction(style: str, text: str, subject: str) -> str:
    return f"Rewrite this text about {subject} {style}. Keep every name, number and date.\n\nText: {text}"


def window(unit: Unit, slot: int, size: int = 2) -> str:
    sents = unit.sentences
    if len(sents) <= size:
        return " ".join(sents)
    starts = list(range(0, len(sents) - size + 1, max(1, size - 1)))
    start = starts[slot % len(starts)]
    return " ".join(sents[start:start + size])


def jobs(unit: Unit, slots: list[int], round_: int, state: dict | None = None) -> list[Job]:
    out = []
    for slot in slots:
        style = STYLES[(slot + round_) % len(STYLES)]
        text = window(unit, slot + round_ * 3)
        messages = [
            {"role": "user", "content": instruction(style, EXAMPLE_TEXT, "the Harlow Bridge")},
            {"role": "assistant", "content": EXAMPLE_OUT[style]},
            {"role": "user", "content": instruction(style, text, unit.subject)},
        ]
        out.append(Job(unit, f"r{round_}-{slot}", messages, source=unit.chunk.text, max_tokens=MAX_TOKENS,
                       data={"window": text}))
    return out


def on_output(job: Job, text: str, finish_reason: str) -> list[Job | Candidate]:
    return [Candidate(job.unit, job.variant, job.source, text=text, check=text, finish_reason=finish_reason,
                      prompt=job.messages[-1]["content"])]

"""Entities: text about how entities relate, within a chunk and across documents (EntiGraph-style).

Entities are the name spans of each chunk (no model needed to find them). Jobs ask the model to explain
how two entities of a chunk relate, sometimes three, and - what multi-step questions need - how an
entity of this chunk relates to an entity of a chunk in ANOTHER document that shares a bridging entity
with this one (A and C here, C and B there: how are A and B connected?). The output is grounded against
every chunk it was shown.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations

from .base import Candidate, Job, Unit
from .text import COMMON_WORDS, names

NAME = "entities"
KIND = "text"
USES_MODEL = True
MAX_TOKENS = 110
MAX_ENTITIES = 6

EXAMPLE_TEXT = "The Harlow Bridge opened in 1931. It was designed by Clara Voss, who also planned the Ender Dam."
EXAMPLE_OUT = ("Clara Voss designed the Harlow Bridge, which opened in 1931. She also planned the Ender Dam, so the "
               "bridge and the dam share their designer.")


def chunk_entities(unit: Unit) -> list[str]:
    """The chunk's most frequent names (at least 3 letters, not a common word), most frequent first."""
    counts = Counter(n for n in names(unit.chunk.text) if len(n) >= 3 and n.lower() not in COMMON_WORDS)
    return [n for n, _ in counts.most_common(MAX_ENTITIES)]


def prepare(units: list[Unit]) -> dict:
    """Entity lists for every chunk of the corpus and, per entity, the chunks that mention it."""
    ents = {u.key: chunk_entities(u) for u in units}
    where: dict[str, list[Unit]] = defaultdict(list)
    for u in units:
        for e in ents[u.key]:
            where[e.lower()].append(u)
    return {"entities": ents, "where": where}


def _specs(unit: Unit, state: dict) -> list[tuple]:
    """Every relation this chunk can ask for, interleaved so a small quota gets a mix of kinds."""
    ents = state["entities"].get(unit.key) or chunk_entities(unit)
    pairs = [("pair", a, b, None, None) for a, b in combinations(ents, 2)]
    triples = [("triple", a, b, c, None) for a, b, c in combinations(ents[:4], 3)]
    cross = []
    for bridge in ents:
        for other in state["where"].get(bridge.lower(), []):
            if other.chunk.doc_id == unit.chunk.doc_id:
                continue
            own = [a for a in ents if a != bridge]
            far = [b for b in state["entities"].get(other.key, []) if b.lower() not in {e.lower() for e in ents}]
            if own and far:
                cross.append(("cross", own[0], far[0], bridge, other))
    mixed: list[tuple] = []
    for i in range(max(len(pairs), len(cross), len(triples))):
        for group in (pairs, cross, triples):
            if i < len(group):
                mixed.append(group[i])
    return mixed


def _mentions(text: str, ents: list[str], sentences: list[str], limit: int = 4) -> str:
    keep = [s for s in sentences if any(e in s for e in ents)][:limit]
    return " ".join(keep) or text[:600]


def instruction(text: str, ents: list[str], bridge: str | None = None) -> str:
    listed = " and ".join(ents) if len(ents) == 2 else f"{ents[0]}, {ents[1]} and {ents[2]}"
    via = f" through {bridge}" if bridge else ""
    return f"Text: {text}\n\nExplain in two sentences how {listed} are connected{via}."


def jobs(unit: Unit, slots: list[int], round_: int, state: dict | None = None) -> list[Job]:
    specs = _specs(unit, state or {"entities": {}, "where": {}})
    if not specs:
        return []
    out = []
    for slot in slots:
        kind, a, b, c, other = specs[(slot + round_ * 5) % len(specs)]
        if kind == "cross":
            text = (_mentions(unit.chunk.text, [a, c], unit.sentences, 3) + " "
                    + _mentions(other.chunk.text, [c, b], other.sentences, 3))
            prompt, partners, source = instruction(text, [a, b], c), [other], unit.chunk.text + "\n" + other.chunk.text
        else:
            ents = [a, b] + ([c] if c else [])
            prompt, partners, source = instruction(_mentions(unit.chunk.text, ents, unit.sentences), ents), [], \
                unit.chunk.text
        messages = [{"role": "user", "content": instruction(EXAMPLE_TEXT, ["Harlow Bridge", "Ender Dam"])},
                    {"role": "assistant", "content": EXAMPLE_OUT},
                    {"role": "user", "content": prompt}]
        out.append(Job(unit, f"r{round_}-{slot}", messages, source=source, max_tokens=MAX_TOKENS, partners=partners,
                       data={"kind": kind, "entities": [e for e in (a, b, c) if e]}))
    return out


def on_output(job: Job, text: str, finish_reason: str) -> list[Job | Candidate]:
    cand = Candidate(job.unit, job.variant, job.source, text=text, check=text, finish_reason=finish_reason,
                     partners=job.partners, prompt=job.messages[-1]["content"])
    # Text about a relation must name both ends of it.
    lowered = text.lower()
    if sum(e.split()[-1].lower() in lowered for e in job.data["entities"][:2]) < 2:
        cand.reject = "misses-entities"
    return [cand]

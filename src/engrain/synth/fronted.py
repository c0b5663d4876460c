"""Wh-questions as people word them: the wh-phrase fronted and the verb inverted ("In what year did the head office
move inland?"), where ``facts.wh_question`` asks in place ("... the head office moved inland in what year?").

Made without a model or a parser: the verb is the first word after the subject that is an auxiliary or a past or
present verb form (lemminflect's word lists tell which), and a sentence this cannot read safely gets no fronted
question (None), so the caller falls back to the in-place one. Asking in place needs no verb moved and is always
grammatical enough; fronting is what the questions of a person, and of a benchmark, look like.
"""

from __future__ import annotations

import re
from functools import lru_cache

from lemminflect import getAllLemmas, getInflection

from .text import COMMON_WORDS, YEAR, Span, split_header

_AUX = {"is", "are", "was", "were", "has", "have", "had", "will", "would", "can", "could", "should", "may", "might",
        "must", "does", "do", "did"}
_HAVE = {"has": "does", "have": "do", "had": "did"}
# A sentence starting with one of these opens with an adverbial, not its subject.
_PREPOSITIONS = {"in", "on", "at", "by", "since", "from", "until", "after", "before", "during", "for", "with",
                 "over", "under", "through", "across", "within", "without", "as", "of", "to", "into", "among",
                 "around", "between", "following", "like", "near", "despite", "when", "while", "if", "although",
                 "because", "once", "each", "every", "today", "now", "then", "there", "here"}
_LOWER_FIRST = {"the", "a", "an", "our", "its", "this", "that", "these", "those", "their", "his", "her", "each",
                "every", "all", "some", "both", "most", "many", "several", "we", "they", "you", "one", "two", "three"}
_DETERMINERS = {"a", "an", "the", "its", "his", "her", "their", "our", "my", "your", "this", "that", "these",
                "those", "every", "each", "all", "some", "two", "three", "four", "five", "six"}
_TIME_PREPS = {"in", "on", "since", "until", "by", "from", "before", "after", "during"}
_PLACE_PREPS = {"in", "at"}
_BREAK = re.compile(r"[,;]|\s(?:and|but|that|which|who|when|where|while|after|before|because|so)\s")  # clause breaks
_UNITS = {"million", "billion", "thousand", "hundred", "per"}  # words between a number and what it counts
_NOT_NOUNS = _PREPOSITIONS | {"and", "or", "than", "more", "less", "about", "to"}


@lru_cache(maxsize=4096)
def _verb(word: str) -> tuple[str, str] | None:
    """(form, lemma) of a word that can be a clause's finite verb: ("aux", word), ("past", lemma) or
    ("present", lemma); None otherwise. A present form that is also a plural noun ("buoys", "runs") is not taken:
    it more often ends the subject than starts the verb."""
    if word in _AUX:
        return "aux", word
    if not word.isalpha() or not word.islower():
        return None
    if past := _lemma_of(word, "VBD"):
        return "past", past
    present = _lemma_of(word, "VBZ")
    return ("present", present) if present and "NOUN" not in getAllLemmas(word) else None


def _lemma_of(word: str, tag: str) -> str | None:
    """The verb whose ``tag`` form (lemminflect's Penn tags: VBD, VBZ, VBN) ``word`` is, or None."""
    return next((lemma for lemma in getAllLemmas(word).get("VERB", ()) if word in getInflection(lemma, tag)), None)


def _wh(span: Span, prev: str, following: list[str]) -> tuple[str, bool, int] | None:
    """(wh-phrase, whether the preposition before the span moves with it, how many words after the span do) for
    asking about ``span``; None where no phrase fits."""
    year = YEAR.fullmatch(span.text)
    if span.kind == "date" or year:
        if prev in _TIME_PREPS and prev != "during" and (prev != "in" or year):
            return f"{prev} {'what year' if year else 'what date'}", True, 0
        return ("When", True, 0) if prev in _TIME_PREPS else None  # "in March 2019", "during the winter of 2011"
    if span.kind == "number":
        taken = 0
        while taken < len(following) and following[taken] in _UNITS:
            taken += 1  # "3.5 million euros" -> "how many million euros"
        noun = following[taken] if taken < len(following) else ""
        if re.fullmatch(r"[a-z]+", noun) and noun not in _NOT_NOUNS and _maybe_noun(noun):
            return "How many " + " ".join(following[:taken + 1]), False, taken + 1
        return None
    if following and re.fullmatch(r"[a-z]+", following[0]) and following[0] not in _NOT_NOUNS:
        return None  # a name modifying a noun ("the Pellmouth workshop") is not the thing asked about
    if prev in _PLACE_PREPS:
        return "Where", True, 0
    return ("Who" if prev == "by" else "Who or what"), False, 0


def _maybe_noun(word: str) -> bool:
    """Not a word known only as another part of speech ("9 electric vans" counts vans, not electric)."""
    lemmas = getAllLemmas(word)
    return not lemmas or "NOUN" in lemmas


def _subject_ok(subject: list[str]) -> bool:
    """A subject the inversion can move: a few words, no clause break, no run-in heading ("Auditor The accounts",
    "Outlook For 2024 the board")."""
    if not 1 <= len(subject) <= 10 or subject[0].lower() in _PREPOSITIONS:
        return False
    function_words = _PREPOSITIONS | _LOWER_FIRST
    return not (any(w.endswith((",", ";", ":")) for w in subject)
                or any(w[:1].isupper() and w.lower() in function_words for w in subject[1:]))


def _lowered(subject: list[str]) -> str:
    """The subject as it reads after the verb: a capital that only started the sentence goes ("Sales outside
    ..." -> "sales outside ..."), a name's stays."""
    word = subject[0].lower()
    common = word in _LOWER_FIRST or word in COMMON_WORDS or word.startswith(("every", "some", "any", "no"))
    dictionary = bool(getAllLemmas(word)) and (len(subject) == 1 or subject[1][:1].islower())
    return " ".join([word if common or dictionary else subject[0], *subject[1:]])


def _inverted(subject: list[str], verb: str, form: tuple[str, str], rest: str) -> str | None:
    """The question's inverted part, "did the office move inland", from the clause's subject words, its finite
    verb (with its form and lemma, ``_finite``) and what follows the verb; None where the subject is not one to
    move."""
    if not _subject_ok(subject):
        return None
    kind, lemma = form
    following = rest.split()
    if kind == "aux" and verb in _HAVE and not (following and _lemma_of(following[0], "VBN")):
        return " ".join([_HAVE[verb], _lowered(subject), "have", rest])  # "has 40 staff": do-support for have
    if kind == "aux":
        return " ".join([verb, _lowered(subject), rest])
    return " ".join(["did" if kind == "past" else "does", _lowered(subject), lemma, rest])


def _clause(text: str) -> str:
    """``text`` up to its first clause break: a question asks one thing."""
    m = _BREAK.search(text)
    return text[:m.start()] if m else text


def _finite(word: str, following: str) -> tuple[str, str] | None:
    """(form, lemma) of ``word`` as a clause's finite verb, given the word after it; None if it is not one. A
    present form that is also a plural noun ("holds", "leads") counts only when an object follows it at once
    ("holds a master's degree", "leads 12 engineers")."""
    form = _verb(word)
    if form or not (word.isalpha() and word.islower()):
        return form
    present = _lemma_of(word, "VBZ") if following.lower() in _DETERMINERS or following[:1].isdigit() else None
    return ("present", present) if present else None


def _split_at_verb(text: str, then: str = "") -> tuple[list[str], str, tuple[str, str], str] | None:
    """(subject words, finite verb, its form, the rest) of a clause: the verb is the first word after the first
    one that can be a finite verb; ``then`` is the word that follows ``text`` in the sentence."""
    tokens = text.split()
    for i, tok in enumerate(tokens[1:], start=1):
        form = _finite(tok, tokens[i + 1] if i + 1 < len(tokens) else then)
        if form:
            return tokens[:i], tok, form, " ".join(tokens[i + 1:])
    return None


def _tidy(text: str) -> str:
    text = re.sub(r"\s+([,;:])", r"\1", re.sub(r"\s+", " ", text)).strip()
    text = re.sub(r"[,;:]\s*$", "", text.rstrip(".!? ")).strip()
    return text[0].upper() + text[1:] + "?"


def fronted_question(statement: str, span: Span) -> str | None:
    """``statement`` asked as a question about ``span`` with the wh-phrase in front and the verb inverted, cut at
    the first clause break after the span, keeping any "Subject: " the statement was prefixed with. None where the
    sentence's shape is not one this can invert: the span in the subject or in a clause of its own, an opening
    adverbial that is not the span's, a name that only modifies a noun, no verb found."""
    head, body = split_header(statement, span.start)
    before, after = body[:span.start - len(head)], body[span.end - len(head):]
    if span.kind == "name":
        before = re.sub(r"\bthe\s+$", "", before)  # "at the Brisvale Institute" asks about the institute
    prev_words = before.split()
    prev = prev_words[-1].lower() if prev_words else ""
    wh = _wh(span, prev, [w.strip(",.;:?!") for w in after.split()[:3]])
    if wh is None:
        return None
    phrase, takes_prev, takes_next = wh
    if takes_prev:
        before, phrase = " ".join(prev_words[:-1]), phrase[0].upper() + phrase[1:]
    after = _clause(" " + " ".join(after.split()[takes_next:]))
    if len(prev_words) <= 1 and takes_prev:  # the span opens the sentence: "In 2014 the office moved ..."
        parts = _split_at_verb(_clause(after.lstrip(" ,")))
        inverted = parts and _inverted(*parts)
        return head + _tidy(f"{phrase} {inverted}") if inverted else None
    parts = _split_at_verb(before, span.text)
    if not parts:
        return None  # no verb before the span: it is in the subject, where asking in place already fronts it
    subject, verb, form, middle = parts
    between = middle.split()  # the words from the verb to the span
    if span.kind != "date" and not takes_prev and between and prev in _PREPOSITIONS and after.strip(" .!?"):
        return None  # a preposition left behind mid-sentence ("... the successor to under the codename ...")
    if span.kind == "name" and between and prev not in _PREPOSITIONS:
        return None  # a name after a noun ("the ferry operator Kessling Sound Lines") is not the verb's object
    if _BREAK.search(f" {middle} ") or any(w in _AUX for w in between):
        return None  # the span sits in a clause of its own ("..., 11.1 metres, was measured")
    if span.kind == "name" and between and between[-1].lower() == "of":
        return None  # "the island of Carrowmede": a name inside a noun phrase
    inverted = _inverted(subject, verb, form, f"{middle} {after}")
    return head + _tidy(f"{phrase} {inverted}") if inverted else None


def polar_question(statement: str, span: Span) -> str | None:
    """``statement`` asked as a yes/no question, its verb inverted ("Did the head office move inland in 1962?"), cut
    at the first clause break, keeping any "Subject: " header; None where the sentence's shape is not one this can
    invert, or where the cut would leave ``span`` (the fact the question is about) out."""
    head, body = split_header(statement, span.start)
    clause = _clause(body)
    if clause.count("(") > clause.count(")"):  # "... for the Eagles (1941": the aside ends past the cut
        clause = clause[:clause.rindex("(")]
    if span.end - len(head) > len(clause.rstrip(" .!?")):
        return None
    parts = _split_at_verb(clause)
    inverted = parts and _inverted(*parts)
    return head + _tidy(inverted) if inverted else None

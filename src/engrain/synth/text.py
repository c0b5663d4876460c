"""Plain-text helpers every strategy shares: sentences, words, and the spans a fact hangs on.

No model and no external NLP package: regular expressions tuned for expository prose. The spans found
here (names, numbers, dates) are what the grounding filter checks and what cloze items blank out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")

# Words that start sentences or titles without being names; a capitalized word from this list is not a name.
COMMON_WORDS = set("""
a an the this that these those it its he she his her they their them we our you your i my me one some any all
each every both either neither no not nor and but or so yet for if then than when while where which who whom
whose what why how after before during since until because although though however therefore thus also
in on at by to from of with without about above below over under into onto upon as is are was were be been
being has have had do does did can could will would shall should may might must there here today later
first second third fourth fifth last next another other such many much more most few several according
yes following despite among between through throughout within along across around against toward towards
while meanwhile furthermore moreover additionally overall finally instead similarly likewise consequently
question answer text rewrite summary note example facts fact statement true false write list explain
""".split())

NUMBER_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
                "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "twenty": 20, "thirty": 30,
                "forty": 40, "fifty": 50, "hundred": 100, "thousand": 1000}

# Titles and other abbreviations a name follows ("Mt. Pankino", "Prof. Sollmann"): no sentence ends after them.
_ABBREVIATIONS = ["Mr", "Mrs", "Ms", "Dr", "St", "Jr", "Sr", "vs", "e\\.g", "i\\.e", "No", "Mt", "Ft", "Prof", "Gen",
                  "Capt", "Col", "Lt", "Sgt", "Gov", "Rev", "Sen", "Rep", "Adm", "Maj", "Hon"]
_ABBREV = "".join(rf"(?<!\b{a})" for a in _ABBREVIATIONS)
# Markdown emphasis may close after the full stop ("**Ada Lenn, Director.** Ada ...").
_SENT_END = re.compile(_ABBREV + r"(?<!\b[A-Z])([.!?][\"'”’)]?(?:\*\*|__|\*|_)?)\s+(?=[\"'“‘(*_]*[A-Z0-9])")
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*", re.UNICODE)
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:[.,]\d+)*(?:%|\b)")
_NAME_TOKEN = r"[A-Z]\w*(?:['’]\w+)*(?:[-–][A-Z]\w*)*"
# "Pask & Dunmore" is one name: a blank over half of it asks for a fragment.
_NAME = re.compile(rf"\b{_NAME_TOKEN}(?:\s+(?:of|de|da|van|von|the|del|du|la|le|&)\s+{_NAME_TOKEN}|\s+{_NAME_TOKEN})*")
_DATE = re.compile(
    rf"\b(?:\d{{1,2}}\s+(?:{'|'.join(MONTHS)})(?:\s+\d{{3,4}})?|(?:{'|'.join(MONTHS)})\s+\d{{1,2}}(?:,\s*\d{{3,4}})?"
    rf"|(?:{'|'.join(MONTHS)})\s+\d{{3,4}}|(?:in|since|by|until|from)\s+\d{{3,4}})\b")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``, split at ., ! or ? followed by a capital or digit (abbreviations kept)."""
    text = re.sub(r"\s+", " ", text).strip()
    if not text:
        return []
    parts, start = [], 0
    for m in _SENT_END.finditer(text):
        parts.append(text[start:m.end(1)].strip())
        start = m.end()
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def normalize(text: str) -> str:
    """Lowercase words joined by single spaces: the form n-gram and overlap checks compare."""
    return " ".join(w.lower() for w in words(text))


def _norm_number(s: str) -> str:
    s = s.strip("+%").replace(",", "")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return s.lstrip("0") or "0"


def numbers(text: str) -> set[str]:
    """Numbers in ``text``, normalized (``1,200`` == ``1200``; ``3.50`` == ``3.5``)."""
    return {_norm_number(m.group()) for m in _NUMBER.finditer(text)}


def number_words(text: str) -> set[str]:
    """Numbers spelled as words ("twenty"), as digits, so "20" in an output is grounded by "twenty" in a source."""
    return {str(NUMBER_WORDS[w.lower()]) for w in words(text) if w.lower() in NUMBER_WORDS}


def _sentence_starts(text: str) -> set[int]:
    starts = {0}
    for m in re.finditer(r"[.!?:;\n\"“]\s*|^\s*[-*•]\s*|\d+[.)]\s+", text, flags=re.M):
        starts.add(m.end())
    return starts


# Words a name never ends with: the connectors inside names, and the function words a sentence starts with.
_RUN_IN = {"of", "de", "da", "van", "von", "del", "du", "la", "le", "the", "a", "an", "and", "or", "but", "for", "in",
           "on", "at", "by", "to", "from", "with", "as", "if", "when", "while", "this", "that", "these", "those", "it",
           "its", "he", "she", "his", "her", "they", "their", "we", "our", "you", "your"}


def names(text: str) -> list[str]:
    """Capitalized spans that look like names ("Hayden Smith", "Bank of Mars", "Zorgon–Calidus").

    A single capitalized word at a sentence start counts only when it is not a common word
    ("The", "However"); multi-word spans are trimmed of leading common words.
    """
    out, starts = [], _sentence_starts(text)
    for m in _NAME.finditer(text):
        toks = m.group().split()
        at_start = m.start() in starts or text[max(0, m.start() - 2):m.start()].strip() == ""
        while toks and toks[0].lower() in COMMON_WORDS:
            toks = toks[1:]
            at_start = False
        # A trailing function word is the next sentence's first word run into a heading ("Outlook For 2024 the board
        # ..." from a PDF whose heading line has no full stop), not part of the name; "Theresa May" keeps its "May".
        while toks and toks[-1].lower() in _RUN_IN:
            toks = toks[:-1]
        if not toks:
            continue
        span = re.sub(r"['’]s$", "", " ".join(toks)).strip("'’")
        if len(toks) == 1 and at_start and m.start() in starts and span.lower() in COMMON_WORDS:
            continue
        out.append(span)
    return out


def dates(text: str) -> list[str]:
    return [m.group() for m in _DATE.finditer(text)]


@dataclass(frozen=True)
class Span:
    """A blankable fact anchor inside a sentence: a name, a number or a date."""

    kind: str  # "name" | "number" | "date"
    text: str
    start: int
    end: int


# Number words a spelled-out count starts with: NUMBER_WORDS' 1 to 90, with the teens and tens it leaves out.
_COUNT_WORDS = [w for w, n in NUMBER_WORDS.items() if 1 <= n < 100] + (
    "thirteen fourteen fifteen sixteen seventeen eighteen nineteen sixty seventy eighty ninety").split()
_ONES = [w for w, n in NUMBER_WORDS.items() if 1 <= n <= 9]
_SPELLED_NUMBER = re.compile(
    rf"\b(?i:{'|'.join(_COUNT_WORDS)})(?:[- ](?:{'|'.join(_ONES)}))?(?:\s+(?:hundred|thousand|million))?"
    r"(?=\s+(?!of\b|another\b|or\b|and\b|to\b|in\b|at\b|by\b|more\b|less\b|than\b)[a-z]{2,})")
YEAR = re.compile(r"1\d{3}|20\d{2}")  # a number read as a year when asked about


def split_header(text: str, end: int | None = None) -> tuple[str, str]:
    """(the "Subject: " header a statement or question was prefixed with, up to its last ": " before ``end``; the
    rest). The header is "" where there is none."""
    cut = text.rfind(": ", 0, len(text) if end is None else end)
    return (text[:cut + 2], text[cut + 2:]) if cut >= 0 else ("", text)


def date_start(m: re.Match) -> int:
    """Where a ``_DATE`` match's date starts, after the preposition it may begin with ("in 1962" -> "1962")."""
    return m.end() - len(re.sub(r"^(?:in|since|by|until|from)\s+", "", m.group()))


def spans(sentence: str, spelled: bool = False) -> list[Span]:
    """Non-overlapping names, numbers and dates in one sentence, dates first (they contain numbers). With
    ``spelled``, numbers written as words count too where a noun follows them ("nine years", "Forty kilometres"),
    not in "one of" or "one another"."""
    found: list[Span] = []
    taken: list[tuple[int, int]] = []

    def free(a: int, b: int) -> bool:
        return all(b <= s or a >= e for s, e in taken)

    for m in _DATE.finditer(sentence):
        a = date_start(m)
        found.append(Span("date", sentence[a:m.end()], a, m.end()))
        taken.append((a, m.end()))
    numbers = list(_NUMBER.finditer(sentence)) + (list(_SPELLED_NUMBER.finditer(sentence)) if spelled else [])
    for m in numbers:
        if free(m.start(), m.end()):
            found.append(Span("number", m.group(), m.start(), m.end()))
            taken.append((m.start(), m.end()))
    for name in names(sentence):
        for m in re.finditer(re.escape(name), sentence):
            if free(m.start(), m.end()):
                found.append(Span("name", name, m.start(), m.end()))
                taken.append((m.start(), m.end()))
                break
    return sorted(found, key=lambda s: s.start)


def fact_spans(text: str, known: str = "") -> list[tuple[int, int]]:
    """(start, end) of every date, number and name in ``text`` (each occurrence, not only the first) whose words
    ``known`` does not hold: the spans an answer states as facts rather than copies from its question. Not ``spans``
    filtered: there a span the question holds would still claim its place, and a name counts once."""
    found: list[tuple[int, int]] = []

    def add(a: int, b: int) -> None:
        held = re.search(rf"(?<!\w){re.escape(text[a:b])}(?!\w)", known, re.IGNORECASE)
        if not held and all(b <= s or a >= e for s, e in found):
            found.append((a, b))

    for m in _DATE.finditer(text):
        add(date_start(m), m.end())
    for m in _NUMBER.finditer(text):
        add(m.start(), m.end())
    for name in names(text):
        for m in re.finditer(re.escape(name), text):
            # a single capitalised word opening a sentence is mostly just that ("Buoys are ..."), not a name,
            # unless it is the whole answer ("Pellmouth.")
            opens = re.search(r"(?:^|[.!?:]\s+)$", text[:m.start()])
            if " " in name or not opens or text.strip(" .") == name:
                add(m.start(), m.end())
    return sorted(found)


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}

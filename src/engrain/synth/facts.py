"""Fact items made without a model: grounded by construction, a floor when the generator is weak.

Per chunk (``synth.facts_orders`` > 0): the passage as written, and its self-contained sentences in several
shuffled orders (knowledge augmentation: each fact seen in several contexts, named in full).

Per sentence of a chunk:
  - the sentence made self-contained: a leading "It"/"Its" becomes the document's subject, and a sentence
    that does not name the subject is prefixed with it (a fact lifted out of its document stays findable);
  - fill-in-the-blank pairs over its names, numbers and dates, and a "complete the sentence" pair whose
    answer continues from the blanked span (the shape of cloze probes), optionally in several instruction
    wordings (``synth.facts_wordings``): a memory layer trained in one wording reaches the fact mostly
    through that wording (README, "Why so few answers");
  - with ``synth.facts_questions``, a question as people ask it about the sentence's first name, number or date
    ("The Orvane archive was founded in what year?", answered by the statement): probes in chat form are questions,
    not blanks or sentence starts;
  - reversed statements for relations written one way round ("A was founded by B" -> "B founded A",
    "A is the capital of B" -> "The capital of B is A"), since a model trained on "A is B's X" does not
    learn "B's X is A" (the reversal curse).

Entity-centred items (``synth.facts_about``, ``about_items``): each name the documents' statements give, asked about ("What do the documents say about X?") and answered with those statements, gathered
across chunks: the way a biography gathers one person's facts (Physics of Language Models 3.1), so a name leads to
its own facts and not to the neighbouring names' ones.

Yes/no items (``synth.facts_polar`` sentences per chunk, ``polar_items``): a sentence asked as a yes/no question
twice, once as stated ("Yes." and the statement) and once with one of its facts swapped for another of the same kind
("No." and the statement). Every other item answers with a statement, so a memory trained on them alone answers
"Are A and B both ...?" by restating it, true or not (experiments/knowledge, 2026-12-06).

Open-book items (``synth.facts_reading`` sentences per chunk, ``open_book``): a sentence's statement continued,
and its wh-question answered, with the chunk and a similar chunk in the prompt as retrieval shows them. A memory
trained closed-book only learns to answer from its weights even when the right passage is in view, so a hybrid
(lora+rag) overrides what it reads (RAFT, Zhang et al. 2024, trains with the source and distractors in view).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from . import synonyms
from .base import Candidate, Unit
from .fronted import fronted_question, polar_question
from .text import _NAME, COMMON_WORDS, MONTHS, YEAR, Span, names, spans, split_header, words

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


_PRONOUN = re.compile(r"^(He|She|His|Her)\s+")
_FIRST_WORD = re.compile(r"^([A-Z][a-z]+)\b(?!\s+[A-Z])")


def named_in_full(sentences: list[str]) -> list[str]:
    """The sentences with the people they speak of named in full: a leading He/She/His/Her becomes the last name
    of two or more words that began a sentence before it, and a first name alone at a sentence start becomes the
    full name it shortens ("Teodora came ..." -> "Teodora Blasko came ..."). A fact lifted out of its paragraph
    then still says whom it is about; full names in every statement are what Physics of Language Models 3.1
    found makes facts extractable."""
    full: dict[str, str] = {}
    last: str | None = None
    out = []
    for sent in sentences:
        m = _PRONOUN.match(sent)
        first = _FIRST_WORD.match(sent)
        if m and last:
            sent = f"{last}'s {sent[m.end():]}" if m.group(1) in ("His", "Her") else f"{last} {sent[m.end():]}"
        elif first and first.group(1) in full:
            sent = full[first.group(1)] + sent[first.end():]
        found = names(sent)
        for name in found:
            if len(name.split()) >= 2 and name.split()[0].isalpha():
                full.setdefault(name.split()[0], name)
        if found and len(found[0].split()) >= 2 and sent.lstrip("*_ ").startswith(found[0]):
            last = found[0]
        out.append(sent)
    return out


def _unprefixed(question: str, subject: str) -> str:
    """``question`` without the "Subject: " that ``_self_contained`` put before its statement."""
    lead = f"{subject}: "
    if not subject or not question.startswith(lead) or len(question) <= len(lead):
        return question
    rest = question[len(lead):]
    return rest[0].upper() + rest[1:]


def _gives_away(sentence: str, span: Span, subject: str) -> bool:
    """Whether asking about ``span`` shows its answer anyway: the same words elsewhere in the sentence, or in the
    subject the prompt names."""
    text = span.text.lower()
    return sentence.lower().count(text) > 1 or text in subject.lower()


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


_YEAR_WORDS = {"in", "since", "until", "from", "by", "before", "after", "of"}
_DAY_NAMES = {"Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"}
_PLACE_WORDS = {"in", "at", "from", "near", "to", "into", "on", "outside", "inside"}


def wh_question(statement: str, span: Span) -> str | None:
    """``statement`` asked as a question about ``span``, the wh-phrase where the span stood ("... founded by whom?",
    "... employs how many researchers?", "Who or what runs ...?"): asked in place, so no verb is moved. None for a
    capitalised word that only starts the sentence (a name finder's false positive, "Engineers from ...")."""
    before, after = statement[:span.start], statement[span.end:].rstrip().rstrip(".!")
    body_start = not before.strip() or before.rstrip().endswith(":")
    if span.kind == "name" and body_start and " " not in span.text:
        return None
    if span.kind == "name" and re.search(r"\bthe\s+$", before):
        before = re.sub(r"\bthe\s+$", "", before)  # "by the Dunmore Works" -> "by whom"
    prev = (words(before) or [""])[-1].lower()
    year = YEAR.fullmatch(span.text) and (prev in _YEAR_WORDS or not re.match(r"\s+[a-z]", after))
    if span.kind == "date" or year:
        wh = "what year" if re.fullmatch(r"\d{3,4}", span.text) else "what date"
    elif span.kind == "number":
        wh = "how many" if re.match(r"\s+[a-z]", after) else "what number"
    elif prev == "by":
        wh = "whom"
    elif span.text in _DAY_NAMES:
        wh = "which day"
        if prev == "every":  # "... every Tuesday at 09:00" -> "... on which day at 09:00"
            before, wh = re.sub(r"\bevery\s+$", "", before), "on which day"
    else:
        wh = "which place" if prev in _PLACE_WORDS else "who or what"
    if body_start:
        wh = "Who" if wh == "whom" else wh[0].upper() + wh[1:]
    return f"{before}{wh}{after}?"


QUESTION_PREFIXES = ("c", "k", "q", "h", "f", "a", "y", "n")  # asked as questions; "s", "r", "o", "b" are statements
POLAR_PREFIXES = ("y", "n")  # yes/no questions: answered "Yes." or "No.", whichever the fact is


def fact_of(variant: str) -> str | None:
    """The sentence (fact) a facts variant is about, e.g. "k3.1w2" -> "3"; None for items spanning a whole chunk
    (shuffled orders) or not made by this strategy. Every question about one sentence shares it, so a held-out
    fact can keep all its question wordings out of training."""
    m = re.fullmatch(r"([sckrqhfabyn])(\d+)(?:\.\d+)?(?:w\d+)?", variant or "")
    return m.group(2) if m else None


def is_question(variant: str) -> bool:
    """Whether a facts variant asks about its fact (rather than stating it)."""
    return fact_of(variant) is not None and variant[0] in QUESTION_PREFIXES


def is_polar(variant: str) -> bool:
    """Whether a facts variant is a yes/no question (``polar_items``)."""
    return fact_of(variant) is not None and variant[0] in POLAR_PREFIXES


def _shuffled_orders(statements: list[str], orders: int, key: str) -> list[str]:
    """The chunk's self-contained statements in ``orders`` distinct shuffled orders (seeded by the chunk), so each
    fact is seen after different neighbours: a model then stores it under its own subject rather than as a step
    in one memorised passage (Physics of Language Models 3.1, sentence-shuffled biographies)."""
    if len(statements) < 2:
        return []
    rng = random.Random(key)
    seen, out = {tuple(range(len(statements)))}, []
    for _ in range(orders * 4):  # a short chunk has few orders: stop once they are used up
        order = list(range(len(statements)))
        rng.shuffle(order)
        if tuple(order) not in seen:
            seen.add(tuple(order))
            out.append(" ".join(statements[i] for i in order))
        if len(out) == orders:
            break
    return out


def statements_of(unit: Unit) -> list[tuple[int, str, str]]:
    """(index, sentence, self-contained statement) for each sentence of the chunk that holds a fact: long enough,
    and not cut off at the chunk's edge."""
    full = named_in_full(unit.sentences)
    return [(i, sent, _self_contained(full[i], unit.subject)) for i, sent in enumerate(unit.sentences)
            if len(words(sent)) >= 4 and re.search(r"[.!?][\"'”’)]?$", sent)]


ABOUT = ["What do the documents say about {name}?", "Tell me what you know about {name}.", "What is known about {name}?"]


def _names_a_thing(name: str, sentence: str) -> bool:
    """A name worth asking about: not a month, and a single word only where it is not the sentence's first word
    (a capitalised "Buoys" or "Everyone" opening a sentence names nothing)."""
    if len(name) < 3 or name.lower() in COMMON_WORDS or name in MONTHS:
        return False
    return " " in name or not sentence.startswith(name)


def about_items(units: list[Unit], per_item: int) -> dict[str, list[Candidate]]:
    """Entity-centred items, by the chunk (key) each belongs to: for every name the corpus's statements give in their
    own words (not only through the subject they were prefixed with), questions about it
    answered with up to ``per_item`` of those statements each, in corpus order, until all of them are used. An item
    belongs to the chunk of its first statement and draws on the others' chunks (grounded against all of them)."""
    said: dict[str, list[tuple[Unit, str]]] = defaultdict(list)
    for unit in units:
        for _, sentence, statement in statements_of(unit):
            for name in dict.fromkeys(n for n in names(sentence) if _names_a_thing(n, sentence)):
                said[name].append((unit, statement))
    out: dict[str, list[Candidate]] = defaultdict(list)
    for name, pairs in said.items():
        for g, at in enumerate(range(0, len(pairs), per_item)):
            group = pairs[at:at + per_item]
            home = group[0][0]
            partners = list({u.key: u for u, _ in group if u.key != home.key}.values())
            answer = " ".join(statement for _, statement in group)
            out[home.key].append(Candidate(
                home, f"e{g}:{name}", "\n\n".join(u.chunk.text for u in [home, *partners]), check=answer,
                messages=[{"role": "user", "content": ABOUT[g % len(ABOUT)].format(name=name)},
                          {"role": "assistant", "content": answer}], partners=partners))
    return out


@dataclass(frozen=True)
class Asking:
    """How a sentence's facts are asked as people ask (the ``synth.facts_*`` settings of the same names).

    ``questions`` wh-questions per sentence (about its first names, numbers or dates, ``wh_question``), answered by
    the statement, or with ``short_answers`` by the asked span alone. With ``fronted``, up to ``questions`` more ask
    with the wh-phrase in front and the verb inverted, where the sentence allows it (``fronted.py``). With
    ``spelled``, numbers written as words ("nine years") are blanked and asked about as digits are. With ``bare``,
    the wh-questions leave out the "Subject: " their statement was prefixed with. With ``reworded``, each in-place
    wh-question comes again with up to two words replaced by synonyms (``synonyms.py``)."""

    questions: int = 0
    short_answers: bool = False
    fronted: bool = False
    spelled: bool = False
    bare: bool = False
    reworded: bool = False


def _wh_items(i: int, statement: str, subject: str, asking: Asking,
              make: Callable[..., Candidate]) -> list[Candidate]:
    """The wh-question items of sentence ``i``: in place (``h``), their rewordings (``h...w1``), fronted (``f``)."""
    asked = [sp for sp in spans(statement, asking.spelled) if not _gives_away(statement, sp, subject)]
    in_place = [(sp, q) for sp in asked if (q := wh_question(statement, sp))]
    fronted = [(sp, q) for sp, _ in in_place if (q := fronted_question(statement, sp))] if asking.fronted else []

    def item(variant: str, span: Span, question: str) -> Candidate:
        question = _unprefixed(question, subject) if asking.bare else question
        return make(variant, q=question, a=span.text if asking.short_answers else statement)

    out = [item(f"h{i}.{j}", sp, q) for j, (sp, q) in enumerate(in_place[:asking.questions])]
    if asking.reworded:
        out += [make(f"{c.variant}w1", q=q, a=c.messages[1]["content"]) for c in list(out)
                if (q := synonyms.reworded(c.messages[0]["content"]))]
    return out + [item(f"f{i}.{j}", sp, q) for j, (sp, q) in enumerate(fronted[:asking.questions])]


def candidates(unit: Unit, limit: int = 64, wordings: int = 1, orders: int = 0,
               asking: Asking = Asking()) -> list[Candidate]:
    """Every fact item of one chunk, in a fixed order (so variant names, and ids, are stable).

    Statements come first and are always kept: each sentence made self-contained (``s``), then, when
    ``orders`` > 0, the passage as written (``d``) and the statements in ``orders`` shuffled orders (``o``).
    ``limit`` caps the questions and reversed statements that follow, taken one sentence at a time (every fact gets its first question before any fact gets a second), so a small
    cap still covers the whole chunk. With ``wordings`` > 1 each kept sentence completion comes again in
    ``wordings - 1`` other wordings. The wh-questions ``asking`` asks for come beside the statements, outside the
    cap: they are how people ask."""
    statements: list[Candidate] = []
    per_sentence: list[list[Candidate]] = []
    wh: list[Candidate] = []
    starts: dict[str, str] = {}  # sentence completion's variant -> the sentence start it asks to complete
    subject = unit.subject
    src = unit.chunk.text

    def make(variant: str, *, text: str | None = None, q: str | None = None, a: str | None = None) -> Candidate:
        if text is not None:
            return Candidate(unit, variant, src, text=text, check=text)
        return Candidate(unit, variant, src, messages=[{"role": "user", "content": q},
                                                       {"role": "assistant", "content": a}], check=a or "")

    for i, sent, statement in statements_of(unit):
        statements.append(make(f"s{i}", text=statement))
        wh += _wh_items(i, statement, subject, asking, make)
        asks: list[Candidate] = []
        for j, sp in enumerate(spans(sent, asking.spelled)[:4]):
            if _gives_away(sent, sp, subject):
                continue  # the answer is visible elsewhere in the prompt: a give-away, not a test
            blanked = sent[:sp.start] + _BLANK + sent[sp.end:]
            prefix = sent[:sp.start].rstrip()
            if len(words(prefix)) >= 5:
                starts[f"k{i}.{j}"] = prefix
                asks.append(make(f"k{i}.{j}", q=COMPLETE.format(subject=subject, start=prefix),
                                 a=sent[sp.start:].strip()))
            asks.append(make(f"c{i}.{j}", q=f"Fill in the blank ({subject}): {blanked}", a=sp.text))
        for j, (statement, question, answer) in enumerate(_reversals(sent)):
            asks.append(make(f"q{i}.{j}", q=question, a=answer))
            asks.append(make(f"r{i}.{j}", text=statement))
        per_sentence.append(asks)
    shuffled = [make(f"o{n}", text=t) for n, t in
                enumerate(_shuffled_orders([c.text for c in statements], orders, unit.key))]
    if orders and statements:
        shuffled.insert(0, make("d", text=src.strip()))  # the passage as written: the words verbatim probes start with
    rounds = [sent[r] for r in range(max(map(len, per_sentence), default=0)) for sent in per_sentence if r < len(sent)]
    kept = statements + shuffled + wh + rounds[:limit]
    for cand in [c for c in kept if c.variant in starts]:
        kept += [make(f"{cand.variant}w{n}", q=wording.format(subject=subject, start=starts[cand.variant]),
                      a=cand.messages[1]["content"]) for n, wording in enumerate(WORDINGS[:wordings - 1], start=1)]
    return kept


def open_book(kept: list[Candidate], neighbour: Unit | None, count: int) -> list[Candidate]:
    """Open-book items for ``count`` sentences of a chunk (chosen by a seeded draw among those with a wh-question):
    the statement (``b``) continued after the chunks' plain texts, and the first wh-question (``a``) asked with the
    chunks labelled, as ``rag`` shows them in each form. ``kept`` is ``candidates``' output for the chunk;
    ``neighbour`` (``similar_chunk``) stands beside it in the prompt, before or after it by the same draw, so the
    memory learns to find the fact among retrieved chunks rather than copy the first one."""
    if count <= 0 or not kept:
        return []
    unit = kept[0].unit
    by_variant = {c.variant: c for c in kept}
    sentences = [c.variant[1:] for c in kept if c.variant[0] == "s" and f"h{c.variant[1:]}.0" in by_variant]
    rng = random.Random(f"open-book:{unit.key}")
    out = []
    for i in sorted(rng.sample(sentences, min(count, len(sentences))), key=int):
        context = [unit] if neighbour is None else rng.sample([unit, neighbour], 2)
        question = by_variant[f"h{i}.0"]
        out.append(Candidate(unit, f"b{i}", unit.chunk.text, text=by_variant[f"s{i}"].text,
                             check=by_variant[f"s{i}"].text, context=context))
        out.append(Candidate(unit, f"a{i}", unit.chunk.text, messages=question.messages, check=question.check,
                             context=context))
    return out


def _nudged(text: str, rng: random.Random) -> str | None:
    """``text`` (a number or a date) with its last whole number moved a little: a year by one to nine, a count by
    about a fifth (at least one), never to zero or below; None where it holds no whole number."""
    found = list(re.finditer(r"\d+", text))
    if not found:
        return None
    m = found[-1]
    n = int(m.group())
    step = rng.randint(1, 9) if YEAR.fullmatch(m.group()) else max(1, round(n * rng.uniform(0.15, 0.4)))
    moved = n + step if n - step <= 0 or rng.random() < 0.5 else n - step
    return text[:m.start()] + str(moved) + text[m.end():]


def _before(sentence: str, span: Span) -> str:
    """The word before ``span`` in its sentence, lower-cased ("" at its start): "by", "in", "on", ..."""
    return (words(sentence[:span.start]) or [""])[-1].lower()


def _shape(span: Span) -> tuple:
    """What a fact swapped for this one must share with it, so that the false claim reads as one: its kind, for a
    name whether it is one word ("American") or several ("Adelaide Lightning"), for a number whether it is a year,
    for a date whether it names a month."""
    if span.kind == "name":
        return span.kind, " " in span.text
    if span.kind == "number":
        return span.kind, bool(YEAR.fullmatch(span.text))
    return span.kind, bool(re.search(r"[A-Za-z]", span.text))


def _swapped(span: Span, statement: str, others: list[tuple[Span, str]], rng: random.Random) -> str | None:
    """What to put in ``span``'s place for a claim that is false: another fact of its kind from the chunk (not one
    the statement already holds), one after the same word if there is one ("founded by" another founder, not a
    place), else for a number or date the same one nudged (``_nudged``); None if neither."""
    same = [(o, before) for o, before in others
            if _shape(o) == _shape(span) and o.text.lower() not in statement.lower()]
    matched = sorted({o.text for o, before in same if before == _before(statement, span)})
    pool = matched or sorted({o.text for o, _ in same})
    if pool:
        return rng.choice(pool)
    return _nudged(span.text, rng) if span.kind in ("number", "date") else None


def _askable(statement: str, span: Span, subject: str) -> bool:
    """A span a yes/no question can swap: not visible elsewhere (``_gives_away``), and not a single capitalised
    word opening the sentence ("Engineers from ..."), which the name finder takes for a name."""
    head, _ = split_header(statement, span.start)
    opens = span.start == len(head)
    return not _gives_away(statement, span, subject) and not (span.kind == "name" and opens and " " not in span.text)


def polar_items(unit: Unit, count: int) -> list[Candidate]:
    """Yes/no items for ``count`` sentences of a chunk (a seeded draw among those whose claim can be asked both ways):
    the statement asked as a yes/no question (``y``, answered "Yes." and the statement) and asked again with its
    first askable fact swapped for another of the same kind (``n``, answered "No." and the true statement). Both
    answers state the fact, so the items ground as the statement does; the false claim is only in the question."""
    if count <= 0:
        return []
    said = statements_of(unit)
    others = [(sp, _before(sent, sp)) for _, sent, _ in said for sp in spans(sent)]
    rng = random.Random(f"polar:{unit.key}")
    pairs: list[tuple[int, str, str, str]] = []
    for i, _, statement in said:
        for span in spans(statement):
            if not _askable(statement, span, unit.subject):
                continue
            true_q = polar_question(statement, span)
            other = _swapped(span, statement, others, rng) if true_q else None
            if not other:
                continue
            false_q = polar_question(statement[:span.start] + other + statement[span.end:],
                                     Span(span.kind, other, span.start, span.start + len(other)))
            if false_q and false_q != true_q:
                pairs.append((i, statement, true_q, false_q))
                break
    out = []
    for i, statement, true_q, false_q in sorted(rng.sample(pairs, min(count, len(pairs)))):
        for variant, question, answer in ((f"y{i}", true_q, f"Yes. {statement}"),
                                          (f"n{i}", false_q, f"No. {statement}")):
            out.append(Candidate(unit, variant, unit.chunk.text, check=answer,
                                 messages=[{"role": "user", "content": question},
                                           {"role": "assistant", "content": answer}]))
    return out


def similar_chunk(unit: Unit, units: list[Unit], sample: int = 32) -> Unit | None:
    """Of a seeded sample of the other chunks, the one sharing most words with ``unit`` (Jaccard): a distractor
    of the kind retrieval puts beside the right chunk, found without an index."""
    others = [u for u in units if u.key != unit.key]
    if not others:
        return None
    pool = random.Random(f"neighbour:{unit.key}").sample(others, min(sample, len(others)))
    own = {w.lower() for w in words(unit.chunk.text)}

    def overlap(other: Unit) -> float:
        theirs = {w.lower() for w in words(other.chunk.text)}
        return len(own & theirs) / max(1, len(own | theirs))
    return max(pool, key=overlap)

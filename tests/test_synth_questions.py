"""How the facts strategy words its questions: fronted wh-questions (the wh-phrase in front, the verb inverted, None
wherever the sentence cannot be read), numbers written as words, questions without their statement's header, and
questions reworded with synonyms."""

from __future__ import annotations

import pytest

from engrain.corpus.schema import Chunk, Document
from engrain.synth import facts
from engrain.synth.base import Unit
from engrain.synth.fronted import fronted_question
from engrain.synth.synonyms import reworded, synonym
from engrain.synth.text import spans


def _ask(statement: str, span_text: str) -> str | None:
    span = next(s for s in spans(statement) if s.text == span_text)
    return fronted_question(statement, span)


@pytest.mark.parametrize("statement, span, question", [
    # an opening adverbial that holds the span moves with it; do-support for a past verb
    ("Our story: In 2014 the head office moved inland to Marrowby.", "2014",
     "Our story: In what year did the head office move inland to Marrowby?"),
    # an auxiliary inverts; the question stops at the first clause break
    ("The present name was adopted in 2018; it comes from the Kelderwick sandbank.", "2018",
     "In what year was the present name adopted?"),
    ("Kelderwick Marine Sensors began on 14 April 2009, when two engineers rented two rooms.", "14 April 2009",
     "On what date did Kelderwick Marine Sensors begin?"),
    # "by" is left behind for "who"; a place preposition becomes "where"
    ("Lumenreef Analytics was founded in 2018 by Sabine Kettleby.", "Sabine Kettleby",
     "Who was Lumenreef Analytics founded in 2018 by?"),
    ("Teodora Blasko trained in naval architecture at the Brisvale Institute.", "Brisvale Institute",
     "Where did Teodora Blasko train in naval architecture?"),
    # a number asks "how many" of the noun it counts, units included; a capital that only began the sentence goes
    ("The pilots bought 12 buoys after a storm.", "12", "How many buoys did the pilots buy?"),
    ("Operating profit was 3.5 million euros.", "3.5", "How many million euros was operating profit?"),
    # "has" with an object takes do-support; a present form that is also a noun is the verb before an object
    ("The field station has 14 staff.", "14", "How many staff does the field station have?"),
    ("Sabine Kettleby holds 3 patents on buoy moorings.", "3",
     "How many patents does Sabine Kettleby hold on buoy moorings?"),
])
def test_fronted_forms(statement, span, question):
    assert _ask(statement, span) == question


@pytest.mark.parametrize("statement, span", [
    ("Kelderwick Marine Sensors began on 14 April 2009.", "Kelderwick Marine Sensors"),  # in the subject
    ("The station sits near the Pellmouth workshop.", "Pellmouth"),  # a name modifying a noun
    ("The first customer was the ferry operator Kessling Sound Lines.", "Kessling Sound Lines"),  # after a noun
    ("Auditor The accounts for 2023 were audited by Pask & Dunmore.", "Pask & Dunmore"),  # a run-in heading
    ("The highest wave ever logged at the station, 11.1 metres, was measured in 2018.", "2018"),  # own clause
    ("For its first three years the business traded as Kelderwick Instruments.", "Kelderwick Instruments"),
    ("The board approved the successor to the Tidebrace T6 under the codename Osprey.", "Tidebrace T6"),
    ("Sales grew by 12 percent in 2023.", "12"),  # "by" would be left mid-sentence
])
def test_fronted_refuses_what_it_cannot_read(statement, span):
    assert _ask(statement, span) is None


def test_candidates_add_fronted_questions_about_the_same_fact():
    text = "The Orvane Archive opened in 1962. In 1975 the archive moved to Harlow Quay."
    doc = Document(id="d", path="d.txt", format="txt", text=text, sha256="d", title="The Orvane Archive")
    unit = Unit(Chunk("d#0", "d", text, 0, len(text), sha256="c"), doc, "The Orvane Archive")
    without = facts.candidates(unit, asking=facts.Asking(questions=2))
    with_fronted = facts.candidates(unit, asking=facts.Asking(questions=2, fronted=True))
    added = [c for c in with_fronted if c.variant.startswith("f")]
    assert {c.variant for c in without} < {c.variant for c in with_fronted}
    asked = {c.variant: c.messages[0]["content"] for c in added}
    assert "In what year did the Orvane Archive open?" in asked.values()
    assert "The Orvane Archive: In what year did the archive move to Harlow Quay?" in asked.values()
    for c in added:
        assert facts.is_question(c.variant)
        statement = next(s for s in with_fronted if s.variant == f"s{facts.fact_of(c.variant)}")
        assert c.messages[1]["content"] == statement.text  # answered by its own fact's statement


def test_spelled_numbers_are_spans_only_when_asked_and_before_a_noun():
    sentence = "Marit Engvold worked for nine years as an auditor; one of them was abroad."
    assert [s.text for s in spans(sentence)] == ["Marit Engvold"]
    assert [(s.kind, s.text) for s in spans(sentence, spelled=True)] == [("name", "Marit Engvold"),
                                                                         ("number", "nine")]
    assert [s.text for s in spans("Forty-two kilometres lie between them.", spelled=True)] == ["Forty-two"]


def test_bare_questions_leave_the_header_out_and_keep_the_statement():
    text = "The station sits on the island of Carrowmede. It opened in 1994."
    doc = Document(id="d", path="d.txt", format="txt", text=text, sha256="d", title="Field station")
    unit = Unit(Chunk("d#0", "d", text, 0, len(text), sha256="c"), doc, "Field station")
    headed = {c.variant: c for c in facts.candidates(unit, asking=facts.Asking(questions=2)) if c.variant[0] == "h"}
    bare = {c.variant: c for c in facts.candidates(unit, asking=facts.Asking(questions=2, bare=True))
            if c.variant[0] == "h"}
    assert headed.keys() == bare.keys() and headed
    for variant, item in bare.items():
        question, answer = item.messages[0]["content"], item.messages[1]["content"]
        assert not question.startswith("Field station: ")  # "It opened" -> "Field station opened" is no header
        assert headed[variant].messages[0]["content"].lower().endswith(question.lower())
        assert answer == headed[variant].messages[1]["content"]  # the statement still names its subject
    assert any(q.messages[1]["content"].startswith("Field station") for q in bare.values())


def test_synonyms_take_a_used_word_of_the_most_used_sense():
    assert synonym("begin", "v") == "start"
    assert synonym("year", "n") is None  # its synonyms are "yr" and "twelvemonth": an abbreviation and a rarity


def test_reworded_keeps_header_names_and_asking_words():
    assert reworded("When did the company begin trading?") == "When did the company start trading?"
    assert reworded("Minutes: The board approved a plant at which place?") == \
        "Minutes: The board sanctioned a plant at which place?"
    assert reworded("Who or what is Kelderwick?") is None  # nothing to replace
    assert reworded("Where did they report the fault?") is None  # "report" is a noun too: its sense needs context


def test_candidates_add_reworded_questions_about_the_same_fact():
    text = "The Orvane Archive began its work in 1962 with 12 volumes."
    doc = Document(id="d", path="d.txt", format="txt", text=text, sha256="d", title="The Orvane Archive")
    unit = Unit(Chunk("d#0", "d", text, 0, len(text), sha256="c"), doc, "The Orvane Archive")
    plain = {c.variant: c for c in facts.candidates(unit, asking=facts.Asking(questions=2))}
    items = {c.variant: c for c in facts.candidates(unit, asking=facts.Asking(questions=2, reworded=True))}
    added = {v: c for v, c in items.items() if v not in plain}
    assert added and all(v.endswith("w1") and facts.is_question(v) for v in added)
    for variant, item in added.items():
        original = plain[variant[:-2]]
        assert "start" in item.messages[0]["content"] and "began" in original.messages[0]["content"]
        assert item.messages[1]["content"] == original.messages[1]["content"]
        assert facts.fact_of(variant) == facts.fact_of(original.variant)  # held out together with its fact


def test_reworded_without_wordnet_says_what_to_install(monkeypatch):
    """wn (WordNet's files) is an optional extra: without it, synth.facts_reworded is a message, not a traceback."""
    from engrain.errors import EngrainError
    from engrain.synth import synonyms

    synonyms._wordnet.cache_clear()
    monkeypatch.setattr(synonyms.importlib.util, "find_spec", lambda name: None)
    try:
        with pytest.raises(EngrainError) as err:
            reworded("Harbour: When was the pier rebuilt?")
        assert "engrain[wordnet]" in err.value.hint and "facts_reworded" in str(err.value)
    finally:
        monkeypatch.undo()
        synonyms._wordnet.cache_clear()

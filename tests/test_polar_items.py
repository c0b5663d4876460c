"""Yes/no items (``synth.facts_polar``): a sentence's claim asked as stated and with one fact swapped, answered "Yes."
or "No." and the true statement, grounded in the chunk, and kept out of training and validation with a held-out fact."""

from __future__ import annotations

import os
import re

from synth_workspace import DOCS, read_jsonl, write_corpus

from engrain.config import SynthConfig
from engrain.corpus.schema import Chunk, Document
from engrain.synth import facts
from engrain.synth.base import Unit, document_subject
from engrain.synth.fronted import polar_question
from engrain.synth.grounding import SourceIndex, check
from engrain.synth.run import run_synth
from engrain.synth.text import Span
from engrain.train.data import encode_item, split_examples
from engrain.workspace import Workspace


def _unit(doc_id: str) -> Unit:
    title, text = DOCS[doc_id]
    doc = Document(id=doc_id, path=f"{doc_id}.txt", format="txt", text=text, sha256="d", title=title)
    chunk = Chunk(id=f"{doc_id}#0", doc_id=doc_id, text=text, start=0, end=len(text), sha256=f"sha-{doc_id}")
    return Unit(chunk, doc, document_subject(doc, chunk))


def _span(sentence: str, text: str, kind: str = "name") -> Span:
    start = sentence.index(text)
    return Span(kind, text, start, start + len(text))


def test_a_claim_is_asked_with_its_verb_inverted():
    s = "Orvik Observatory was founded by Ilse Marren in 1962."
    assert polar_question(s, _span(s, "Ilse Marren")) == "Was Orvik Observatory founded by Ilse Marren in 1962?"
    s = "Kell Telescope: The observatory houses the Kell Telescope."
    at = s.rindex("Kell Telescope")
    assert polar_question(s, Span("name", "Kell Telescope", at, at + 14)) == \
        "Kell Telescope: Does the observatory house the Kell Telescope?"
    s = "The works moved to Varra in 1930, and the founder retired in 1944."
    assert polar_question(s, _span(s, "1930", "date")) == "Did the works move to Varra in 1930?"
    assert polar_question(s, _span(s, "1944", "date")) is None  # cut off at the clause break: not asked about


def test_each_sentence_drawn_is_asked_true_and_false_and_both_answers_state_the_fact():
    units = [_unit(d) for d in DOCS]
    items = [c for u in units for c in facts.polar_items(u, 8)]
    assert items, "the test corpus's sentences can be asked yes or no"
    by_fact: dict[tuple[str, str], dict[str, facts.Candidate]] = {}
    for c in items:
        by_fact.setdefault((c.unit.key, c.variant[1:]), {})[c.variant[0]] = c
    for (key, i), pair in by_fact.items():
        assert set(pair) == {"y", "n"}
        yes, no = pair["y"].messages, pair["n"].messages
        statement = yes[1]["content"].removeprefix("Yes. ")
        assert yes[1]["content"] == f"Yes. {statement}" and no[1]["content"] == f"No. {statement}"
        assert yes[0]["content"].endswith("?") and no[0]["content"].endswith("?")
        assert yes[0]["content"] != no[0]["content"]
        # The false claim differs in one place, a fact's few words: the rest of the question is the true one's.
        a, b = yes[0]["content"], no[0]["content"]
        head = len(os.path.commonprefix([a, b]))
        tail = len(os.path.commonprefix([a[head:][::-1], b[head:][::-1]]))
        assert 0 < len(a[head:len(a) - tail].split()) <= 4 and 0 < len(b[head:len(b) - tail].split()) <= 4, (a, b)
        unit = next(u for u in units if u.key == key)
        assert any(s == statement for _, _, s in facts.statements_of(unit))
        source = SourceIndex(unit.chunk.text)
        for c in pair.values():  # what is trained as an answer is the source's
            assert check(c.check, source, strictness="strict", min_words=1).reason not in {"ungrounded-name",
                                                                                          "ungrounded-number"}
    # A seeded draw: the same items again, and a count caps the sentences.
    assert [c.messages for c in items] == [c.messages for u in units for c in facts.polar_items(u, 8)]
    assert all(len(facts.polar_items(u, 1)) <= 2 for u in units) and not facts.polar_items(units[0], 0)


def test_a_false_claim_swaps_a_fact_of_the_same_kind():
    unit = _unit("dunmore-works")
    pairs = {c.variant: c.messages[0]["content"] for c in facts.polar_items(unit, 8)}
    for variant, question in pairs.items():
        if variant[0] != "n":
            continue
        true = pairs["y" + variant[1:]]
        gone = [w for w in re.findall(r"[\w']+", true) if w not in question]
        added = [w for w in re.findall(r"[\w']+", question) if w not in true]
        assert gone and added, (true, question)
        # a year for a year, a name of several words for another such name
        assert all(w.isdigit() for w in gone) == all(w.isdigit() for w in added)


def test_yes_no_items_are_made_by_synthesis_and_held_out_with_their_fact(tmp_path, tokenizer):
    ws = Workspace.at(write_corpus(tmp_path / "ws"))
    run_synth(ws, SynthConfig(strategies=["facts"], facts_polar=2), show_progress=False)
    items = read_jsonl(ws.synth_dir / "facts.jsonl")
    polar = [it for it in items if facts.is_polar(it["variant"])]
    assert polar and {it["variant"][0] for it in polar} == {"y", "n"}
    assert facts.is_question("y3") and facts.fact_of("n3") == "3" and not facts.is_polar("h3.0")
    keyed = [(it["id"], it) for it in items]
    examples = [encode_item(tokenizer, item, key) for key, item in keyed]
    train, val = split_examples(examples, dict(keyed), fraction=0.5, max_val=1000)
    assert val and not any(facts.is_polar(dict(keyed)[e.key]["variant"]) for e in val)
    held = {(dict(keyed)[e.key]["chunk_sha256"][0], facts.fact_of(dict(keyed)[e.key]["variant"])) for e in val}
    trained = {e.key for e in train}
    for key, item in keyed:
        if facts.is_polar(item["variant"]):
            fact = (item["chunk_sha256"][0], facts.fact_of(item["variant"]))
            assert (key in trained) != (fact in held), item["variant"]

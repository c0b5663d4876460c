"""The parts of synthesis that need no model: text spans, facts, grounding, dedup, the leak guard, the store."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from synth_workspace import DOCS, read_jsonl, write_corpus

from engrain.config import SynthConfig
from engrain.corpus.schema import Chunk, Document
from engrain.synth import facts
from engrain.synth.base import Unit, document_subject
from engrain.synth.dedup import NearDuplicateIndex
from engrain.synth.grounding import SourceIndex, check
from engrain.synth.leak import LeakGuard
from engrain.synth.run import run_synth
from engrain.synth.store import AppendLog, item_id
from engrain.synth.text import names, numbers, spans, split_sentences
from engrain.workspace import Workspace


def _unit(doc_id: str) -> Unit:
    title, text = DOCS[doc_id]
    doc = Document(id=doc_id, path=f"{doc_id}.txt", format="txt", text=text, sha256="d", title=title)
    chunk = Chunk(id=f"{doc_id}#0", doc_id=doc_id, text=text, start=0, end=len(text), sha256="c")
    return Unit(chunk, doc, document_subject(doc, chunk))


def test_sentences_names_numbers():
    text = "Dr. Ada Lenn met Mr. Tobias Lenn in Varra. It cost 1,200 crowns! Was it 3.50 each? Yes."
    assert split_sentences(text) == ["Dr. Ada Lenn met Mr. Tobias Lenn in Varra.", "It cost 1,200 crowns!",
                                     "Was it 3.50 each?", "Yes."]
    assert split_sentences("Mt. Pankino erupted. Prof. Ida Sollmann sailed.") == ["Mt. Pankino erupted.",
                                                                                "Prof. Ida Sollmann sailed."]
    assert numbers(text) == {"1200", "3.5"}
    assert names("However, the Bank of Varra and Tobias Lenn's shop opened.") == ["Bank of Varra", "Tobias Lenn"]
    kinds = {(s.kind, s.text) for s in spans("The Kell Telescope was built on 4 March 1960 for 300 crowns.")}
    assert kinds == {("name", "Kell Telescope"), ("date", "4 March 1960"), ("number", "300")}


def test_facts_make_self_contained_cloze_and_reversed_items():
    unit = _unit("orvik-observatory")
    cands = facts.candidates(unit, limit=200)
    texts = [c.text for c in cands if c.text is not None]
    pairs = [(c.messages[0]["content"], c.messages[1]["content"]) for c in cands if c.messages]
    # "It was founded by ..." gets its subject back.
    assert "Orvik Observatory was founded by Ilse Marren in 1962." in texts
    # A sentence that does not name the subject is prefixed with it.
    assert any(t.startswith("Orvik Observatory: In 1988 the observatory discovered") for t in texts)
    # Fill-in-the-blank over names, numbers and dates, answers taken from the sentence.
    assert ("Fill in the blank (Orvik Observatory): The observatory houses the Kell Telescope, which has a mirror "
            "of ____ metres.", "4") in pairs
    assert any(q.endswith("discovered the comet ____.") and a == "Brannock" for q, a in pairs)
    # Reversed statements: "A was the first director of B" -> "The first director of B was A".
    assert "The first director of the Orvik Observatory was Ilse Marren." in texts
    assert ("Who or what was the first director of the Orvik Observatory?", "Ilse Marren") in pairs
    # Passive "founded by" reversed to active.
    kell = facts.candidates(_unit("kell-telescope"), limit=200)
    assert "The Dunmore Works built the Kell Telescope." in [c.text for c in kell]
    # Every item is grounded by construction, and variants (hence ids) are unique and stable.
    source = SourceIndex(unit.chunk.text)
    for c in cands:
        assert check(c.check, source, strictness="strict", min_words=1).reason not in {"ungrounded-name",
                                                                                         "ungrounded-number"}
    variants = [c.variant for c in cands]
    assert len(variants) == len(set(variants))
    assert variants == [c.variant for c in facts.candidates(unit, limit=200)]


def test_sentence_completions_come_in_the_wordings_asked_for():
    """synth.facts_wordings: each kept sentence completion again in other wordings, same answer, none the wording the
    benchmark asks in; the cap still counts facts, and one wording (the default) changes nothing."""
    from engrain.evaluate.compare import CLOZE_INSTRUCTION

    unit = _unit("orvik-observatory")
    one = facts.candidates(unit, limit=12)
    three = facts.candidates(unit, limit=12, wordings=3)
    assert [c.variant for c in facts.candidates(unit, limit=12, wordings=1)] == [c.variant for c in one]
    assert three[:len(one)] == one
    completions = [c for c in one if c.variant.startswith("k")]
    assert completions and len(three) == len(one) + 2 * len(completions)
    by_variant = {c.variant: c for c in three}
    for c in completions:
        prompt, answer = c.messages[0]["content"], c.messages[1]["content"]
        start = facts.completion_parts(prompt)[1]
        others = [by_variant[f"{c.variant}w{n}"] for n in (1, 2)]
        assert [o.messages[1]["content"] for o in others] == [answer, answer]
        asked = [o.messages[0]["content"] for o in others]
        assert len({prompt, *asked}) == 3 and all(q.endswith(start) for q in asked)
        assert not any(CLOZE_INSTRUCTION.strip(": ") in q for q in asked)
    with pytest.raises(ValueError):
        SynthConfig(facts_wordings=6)


def test_facts_skip_give_aways_and_cut_sentences():
    text = "Varra Port is a town. Varra Port trades with Varra Port daily. The town was founded in 1801 and"
    doc = Document(id="v", path="v.txt", format="txt", text=text, sha256="x", title="Varra Port")
    unit = Unit(Chunk("v#0", "v", text, 0, len(text), sha256="s"), doc, "Varra Port")
    cands = facts.candidates(unit)
    assert all("1801" not in (c.text or "") and "1801" not in json.dumps(c.messages) for c in cands)
    assert not any(c.messages and c.messages[1]["content"] == "Varra Port" for c in cands)


def test_grounding_rejects_invented_names_numbers_and_degenerate_output():
    src = SourceIndex(DOCS["orvik-observatory"][1])
    ok = check("Ilse Marren founded the Orvik Observatory on Mount Tessel in 1962.", src)
    assert ok.ok, ok
    assert check("Ilse Marren founded the observatory in 1971.", src).reason == "ungrounded-number"
    assert check("Peter Hamlin founded the Orvik Observatory in 1962.", src).reason == "ungrounded-name"
    assert check("The observatory", src).reason == "too-short"
    assert check("The Orvik Observatory was founded by Ilse Marren in", src, finish_reason="length").reason == \
        "truncated"
    loop = "The observatory is on the mountain. " * 8
    assert check(loop, src).reason == "repetitive"
    assert check("Обсерватория Орвик была основана Ильзе Маррен в 1962 году на горе.", src).reason == "off-language"
    assert check("The theory of chromodynamics explains the confinement of hadrons through gluon exchange.",
                 src).reason == "novel-content"
    # Strictness: lenient lets small counts through; off accepts anything non-empty.
    assert not check("The observatory has 3 domes and was founded by Ilse Marren.", src, strictness="strict").ok
    assert check("The observatory has 3 domes and was founded by Ilse Marren.", src, strictness="lenient").ok
    assert check("Peter Hamlin 1971", src, strictness="off").ok
    assert check("", src, strictness="off").reason == "empty"
    # Copying the instructions back is rejected.
    prompt = "Rewrite this text in simple words. Keep every name, number and date. Text: ..."
    assert check("Rewrite this text in simple words. Keep every name, number and date.", src,
                 prompt=prompt).reason == "echoes-prompt"


def test_near_duplicates_are_removed_but_distinct_text_kept():
    idx = NearDuplicateIndex(threshold=0.8)
    base = ("The Orvik Observatory was founded by Ilse Marren in 1962 on Mount Tessel and houses the Kell "
            "Telescope, which has a mirror of four metres and is serviced by engineers from Varra.")
    assert idx.add(base)
    assert not idx.add(base.upper())  # exact after normalisation
    assert not idx.add(base.replace("four metres", "four meters"))  # one word changed
    assert idx.add("Tobias Lenn founded the Dunmore Works, a glass company in Varra, in 1921.")
    assert idx.add_exact("Fill in the blank: ____ founded the Dunmore Works in 1921.")
    assert idx.add_exact("Fill in the blank: Tobias Lenn founded the ____ in 1921.")
    assert not idx.add_exact("fill in the blank: ____ founded the Dunmore Works in 1921.")


def test_leak_guard_modes():
    questions = ["In what year was the comet Brannock discovered by the observatory staff?",
                 "Who was the first director of the Orvik Observatory?"]
    source = DOCS["orvik-observatory"][1]
    guard = LeakGuard(questions, n=6, mode="source")
    assert guard.source_overlaps(source)  # the document itself says "first director of the Orvik Observatory"
    # Overlap the source explains is allowed in source mode, text from the questions alone is not.
    assert not guard.leaked("Ilse Marren was the first director of the Orvik Observatory.", source)
    assert guard.leaked("The comet Brannock discovered by the observatory staff was bright.", source)
    strict = LeakGuard(questions, n=6, mode="strict")
    assert strict.leaked("Ilse Marren was the first director of the Orvik Observatory.", source)
    assert not strict.leaked("Tobias Lenn founded the Dunmore Works.", source)
    short = LeakGuard(["Who built it?"], n=8)
    assert short.leaked("We asked who built it? Nobody knew.", "unrelated source")


def test_leak_guard_in_a_run_drops_and_reports(tmp_path):
    ws = Workspace.at(write_corpus(tmp_path / "ws"))
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text(json.dumps({"id": "q1", "question": "Who was the first director of the Orvik Observatory?",
                                 "answers": ["Ilse Marren"]}) + "\n")
    summary = run_synth(ws, SynthConfig(strategies=["facts"], leak_mode="strict"), exclude_questions=[qfile],
                        show_progress=False)
    rep = summary["strategies"]["facts"]
    assert rep["chunks_overlapping_questions"] == 1 and rep["chunks_leak_blocked"] == 1
    items = read_jsonl(ws.synth_dir / "facts.jsonl")
    assert items and not any("first director" in json.dumps(it) for it in items)


def test_append_log_repairs_a_torn_tail(tmp_path):
    log = AppendLog(tmp_path / "x.jsonl")
    log.append([{"id": "a"}, {"id": "b"}])
    with open(tmp_path / "x.jsonl", "a") as f:
        f.write('{"id": "c", "te')  # a write cut by a kill
    log = AppendLog(tmp_path / "x.jsonl")
    assert [r["id"] for r in log.rows()] == ["a", "b"]
    log.append([{"id": "d"}])
    assert [r["id"] for r in read_jsonl(tmp_path / "x.jsonl")] == ["a", "b", "d"]
    assert item_id("qa", "abc", "r0-1") == item_id("qa", "abc", "r0-1") != item_id("qa", "abc", "r0-2")


def test_facts_run_writes_the_training_format(tmp_path):
    ws = Workspace.at(write_corpus(tmp_path / "ws"))
    summary = run_synth(ws, SynthConfig(strategies=["facts"]), show_progress=False)
    items = read_jsonl(ws.synth_dir / "facts.jsonl")
    assert len(items) == summary["strategies"]["facts"]["accepted"] > 20
    for it in items:
        assert {"id", "strategy", "chunk_ids", "doc_ids", "chunk_sha256", "generator", "seed", "created"} <= set(it)
        assert ("messages" in it) != ("text" in it)
        if "messages" in it:
            assert [m["role"] for m in it["messages"]] == ["user", "assistant"]
    assert len({it["id"] for it in items}) == len(items)
    # A second run has nothing to do.
    again = run_synth(ws, SynthConfig(strategies=["facts"]), show_progress=False)
    assert again["strategies"]["facts"]["chunks_run"] == 0
    assert len(read_jsonl(ws.synth_dir / "facts.jsonl")) == len(items)
    # In three wordings, a fresh run writes each sentence completion three times, all accepted (none a duplicate).
    ws3 = Workspace.at(write_corpus(tmp_path / "ws3"))
    run_synth(ws3, SynthConfig(strategies=["facts"], facts_wordings=3), show_progress=False)
    items3 = read_jsonl(ws3.synth_dir / "facts.jsonl")
    n_completions = sum(1 for it in items if "messages" in it and facts.completion_parts(it["messages"][0]["content"]))
    assert n_completions and len(items3) == len(items) + 2 * n_completions


@pytest.mark.parametrize("bad", ["nope", ""])
def test_cli_rejects_unknown_strategies(tmp_path, bad):
    from typer.testing import CliRunner

    from engrain.cli import app

    write_corpus(tmp_path / "ws")
    res = CliRunner().invoke(app, ["synth", "-w", str(tmp_path / "ws"), "--strategies", bad or ","])
    assert res.exit_code != 0
    assert "strateg" in str(res.exception) + res.output


def test_leak_guard_stops_a_template_that_carries_question_text(tmp_path, monkeypatch):
    from engrain.errors import EngrainError
    from engrain.synth import rephrase

    ws = Workspace.at(write_corpus(tmp_path / "ws"))
    question = "Which glass company made the mirror for the largest telescope in the world?"
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"id": "q", "question": question, "answers": ["x"]}) + "\n")
    monkeypatch.setattr(rephrase, "EXAMPLE_TEXT", f"An example that quotes: {question}")
    with pytest.raises(EngrainError, match="prompt template"):
        run_synth(ws, SynthConfig(strategies=["rephrase"]), generator=object(), exclude_questions=[qfile],
                  show_progress=False)


def test_wh_questions_are_asked_in_place_and_answered_by_the_statement():
    """synth.facts_questions: questions as people ask them, the wh-phrase where the name, number or date stood; the
    answer is the statement, so nothing outside the chunk is claimed. Off (0) adds nothing."""
    unit = _unit("orvik-observatory")
    plain = facts.candidates(unit, limit=12)
    asked = facts.candidates(unit, limit=12, asking=facts.Asking(questions=2))
    assert [c.variant for c in plain] == [c.variant for c in asked if not c.variant.startswith("h")]
    pairs = {c.messages[0]["content"]: c.messages[1]["content"] for c in asked if c.variant.startswith("h")}
    assert pairs["Orvik Observatory was founded by whom in 1962?"] == "Orvik Observatory was founded by Ilse Marren in 1962."
    assert "Orvik Observatory was founded by Ilse Marren in what year?" in pairs
    assert "Orvik Observatory: About how many astronomers work there today?" in pairs
    assert "Orvik Observatory: In what year the observatory discovered the comet Brannock?" in pairs
    for q, a in pairs.items():  # the answer is never in the question, and every question is about one sentence
        assert q.endswith("?") and a not in q
    assert all(facts.is_question(c.variant) and facts.fact_of(c.variant) for c in asked if c.variant.startswith("h"))
    kell = {c.messages[0]["content"]
            for c in facts.candidates(_unit("kell-telescope"), limit=0, asking=facts.Asking(questions=2))
            if c.variant.startswith("h")}
    assert "The Kell Telescope was built by whom in 1960?" in kell  # "by the Dunmore Works": no stray "the"
    assert not any(q.split(": ")[-1].startswith("Who or what from") for q in kell)  # "Engineers" is not a name


def test_short_answers_give_the_asked_span_alone_and_change_nothing_else():
    """synth.facts_short_answers: the same wh-questions, answered by the name, number or date they ask about."""
    unit = _unit("orvik-observatory")
    long = facts.candidates(unit, limit=12, asking=facts.Asking(questions=2))
    short = facts.candidates(unit, limit=12, asking=facts.Asking(questions=2, short_answers=True))
    assert [(c.variant, c.messages or c.text) for c in long if not c.variant.startswith("h")] == \
        [(c.variant, c.messages or c.text) for c in short if not c.variant.startswith("h")]
    pairs = {c.messages[0]["content"]: c.messages[1]["content"] for c in short if c.variant.startswith("h")}
    assert pairs["Orvik Observatory was founded by whom in 1962?"] == "Ilse Marren"
    assert pairs["Orvik Observatory was founded by Ilse Marren in what year?"] == "1962"
    assert all(a in unit.chunk.text and a not in q for q, a in pairs.items())


def test_questions_ask_whole_names_and_days_not_heading_fragments():
    """A name joined by "&" is one span (a blank over half of it asks for a fragment); the function word a PDF heading
    ran into ("Outlook For 2024 ...") is not part of a name, while a name ending in another common word keeps it; a
    weekday is asked as a day, not as "who or what"."""
    from engrain.synth.text import names, spans

    assert "Pask & Dunmore" in names("The accounts were audited by Pask & Dunmore.")
    assert names("Report 2023: Outlook For 2024 the board expects more.")[-1] == "Outlook"
    assert names("Theresa May spoke on BBC One.") == ["Theresa May", "BBC One"]
    assert names("Bank of Mars") == ["Bank of Mars"]
    sentence = "The accounts for 2023 were audited by Pask & Dunmore."
    assert facts.wh_question(sentence, spans(sentence)[-1]) == "The accounts for 2023 were audited by whom?"
    sentence = "The open-door hour is every Tuesday at noon."
    day = next(s for s in spans(sentence) if s.text == "Tuesday")
    assert facts.wh_question(sentence, day) == "The open-door hour is on which day at noon?"


def test_entity_centred_items_gather_a_names_statements_across_chunks():
    """synth.facts_about: each name is asked about and answered with the statements that give it, from every chunk,
    at most ``per_item`` to an item; the item belongs to the chunk of its first statement, draws on the others (its
    grounding source holds all of them), and is no question about one fact (the held-out split leaves it alone)."""
    units = [Unit(replace(u.chunk, sha256=u.chunk.doc_id), u.doc, u.subject) for u in map(_unit, DOCS)]  # own keys
    about = facts.about_items(units, 2)
    items = [c for cands in about.values() for c in cands]
    varra = [c for c in items if c.variant.split(":", 1)[1] == "Varra"]
    assert [(c.unit.chunk.doc_id, [u.chunk.doc_id for u in c.partners], c.messages[0]["content"]) for c in varra] == [
        ("kell-telescope", [], "What do the documents say about Varra?"),
        ("dunmore-works", [], "Tell me what you know about Varra.")]
    assert varra[0].messages[1]["content"].count("Varra") == 2  # two statements of one chunk: "ground in the town of
    assert "based in Varra" in varra[1].messages[1]["content"]  # Varra", "Engineers from Varra"; then the third
    lenn = [c for c in items if c.variant.split(":", 1)[1] == "Tobias Lenn"]
    assert [c.messages[1]["content"] for c in lenn] == ["Dunmore Works was founded by Tobias Lenn in 1921. "
                                                        "Dunmore Works: Tobias Lenn was the brother of Ada Lenn."]
    # Three to an item: the observatory's two statements and the telescope's one that names it, in one item that
    # draws on both chunks.
    orvik = [c for cands in facts.about_items(units, 3).values() for c in cands if c.variant == "e0:Orvik Observatory"]
    assert [(c.unit.chunk.doc_id, [u.chunk.doc_id for u in c.partners]) for c in orvik] == \
        [("orvik-observatory", ["kell-telescope"])]
    items += orvik
    for cand in items:
        shown = [cand.unit, *cand.partners]
        statements = [st for u in shown for _, _, st in facts.statements_of(u)]
        answer = cand.messages[1]["content"]
        assert answer in " ".join(statements) or all(st in statements for st in _split_statements(answer, statements))
        assert all(u.chunk.text in cand.source for u in shown)  # grounded against every chunk it draws on
        assert facts.fact_of(cand.variant) is None and not facts.is_question(cand.variant)
    # A single word that only opens a sentence, or a month, is not asked about.
    assert not {c.variant.split(":", 1)[1] for c in items} & {"Engineers", "The", "In"}


def _split_statements(answer: str, statements: list[str]) -> list[str]:
    """The statements an answer joins, in order (each is one of ``statements``)."""
    out, rest = [], answer
    while rest:
        match = next((st for st in statements if rest.startswith(st)), None)
        if match is None:
            return [rest]
        out.append(match)
        rest = rest[len(match):].lstrip()
    return out


def test_a_title_the_text_mentions_once_stays_the_subject_and_a_heading_alone_does_not():
    """The subject a lifted sentence is given: "The Dunmore Works is a glass company ..." mentions its title once,
    so "It was founded by Tobias Lenn" becomes "Dunmore Works was founded by ...", not "Tobias Lenn was founded by
    Tobias Lenn"; a heading ("Our story") that the text only carries as its first line gives way to the name the
    text repeats."""
    from engrain.synth.base import _named_instead

    assert _unit("dunmore-works").subject == "Dunmore Works"
    text = "# Our story\n\nAda Brennick opened the museum. Ada Brennick still runs it."
    assert _named_instead("Our story", text) == "Ada Brennick"
    assert _named_instead("Our story", text + " Our story began in 1931.") == "Our story"


def test_a_facts_run_with_entity_items_writes_them_with_every_chunk_they_draw_on(tmp_path):
    ws = Workspace.at(write_corpus(tmp_path / "ws"))
    run_synth(ws, SynthConfig(strategies=["facts"], facts_about=4), show_progress=False)
    about = [it for it in read_jsonl(ws.synth_dir / "facts.jsonl") if it["variant"].startswith("e")]
    assert {it["messages"][0]["content"] for it in about} >= {"What do the documents say about Varra?",
                                                                "What do the documents say about Kell Telescope?"}
    assert any(len(it["chunk_ids"]) > 1 for it in about)  # drawn on more than one chunk, and says which

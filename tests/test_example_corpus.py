"""The example corpus (examples/acme): generated files match their sources, questions are valid and do not leak."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from engrain.errors import EngrainError
from engrain.example_corpus import BINARY_DOCS, build_binary_docs, parse_source, plain_text, read_source

from conftest import EXAMPLES

ACME = EXAMPLES / "acme"
FIELDS = {"id", "type", "question", "answers", "docs", "hops", "tags"}

# A shared run of this many words between a question and its documents counts as copied phrasing. The longest
# names in the corpus ("Brisvale Institute of Technology", "Harbour Authority of Oskerby") are four words, so a
# paraphrased question can repeat a name but never needs five consecutive words of the text. Five is stricter
# than six: no shared 5-gram implies no shared 6-gram.
LEAK_NGRAM = 5


def doc_text(path: Path) -> str:
    """The visible text of one document, extracted with the usual libraries (tables included)."""
    if path.suffix == ".html":
        from bs4 import BeautifulSoup

        soup = BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")
        for tag in soup(["script", "style"]):
            tag.decompose()
        return soup.get_text(" ")
    if path.suffix == ".pdf":
        from pypdf import PdfReader

        return "\n".join(page.extract_text() for page in PdfReader(path).pages)
    if path.suffix == ".docx":
        from docx import Document

        lines = []
        for item in Document(path).iter_inner_content():  # paragraphs and tables in document order
            if hasattr(item, "rows"):
                lines.extend(" ".join(cell.text for cell in row.cells) for row in item.rows)
            else:
                lines.append(item.text)
        return "\n".join(lines)
    return path.read_text(encoding="utf-8")


def squash(text: str) -> str:
    return " ".join(text.split())


def words(text: str) -> list[str]:
    return re.sub(r"[^0-9a-z]+", " ", text.lower()).split()


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


@pytest.fixture(scope="module")
def docs() -> dict[str, str]:
    return {p.stem: doc_text(p) for p in sorted((ACME / "docs").iterdir()) if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def questions() -> list[dict]:
    lines = (ACME / "questions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_generator_reproduces_committed_documents(tmp_path):
    first = build_binary_docs(tmp_path / "a", ACME / "sources")
    second = build_binary_docs(tmp_path / "b", ACME / "sources")
    assert [p.name for p in first] == [f"{k}.{v}" for k, v in BINARY_DOCS.items()]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs between two builds: output is not deterministic"
        source = squash(plain_text(read_source(ACME / "sources" / f"{a.stem}.md")))
        assert squash(doc_text(a)) == source, f"generated {a.name} does not carry its source text"
        committed = ACME / "docs" / a.name
        assert squash(doc_text(committed)) == source, (
            f"{committed} is stale: run 'python -m engrain.example_corpus examples/acme'")


def test_docx_keeps_its_table():
    from docx import Document

    tables = Document(ACME / "docs" / "staff-handbook.docx").tables
    assert tables and [c.text for c in tables[0].rows[0].cells][:2] == ["Site", "Town"]
    assert len(tables[0].rows) == 5


def test_source_parser_names_the_bad_line():
    blocks = parse_source("# T\n\npara one\ncontinues\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n")
    assert [b.kind for b in blocks] == ["title", "para", "table"]
    assert blocks[1].text == "para one continues" and blocks[2].rows == (("a", "b"), ("1", "2"))
    with pytest.raises(EngrainError, match=r"x\.md:3"):
        parse_source("| a | b |\n| - | - |\n| 1 | 2 | 3 |\n", origin="x.md")
    with pytest.raises(EngrainError, match=r"x\.md:1"):
        parse_source("### too deep\n", origin="x.md")


def test_corpus_mixes_formats(docs):
    suffixes = Counter(p.suffix for p in (ACME / "docs").iterdir())
    assert 10 <= sum(suffixes.values()) <= 20
    for ext in (".md", ".txt", ".html", ".pdf", ".docx"):
        assert suffixes[ext] >= 1, f"no {ext} document"
    html = (ACME / "docs" / "press-release-lumenreef.html").read_text()
    assert "<nav" in html and "<footer" in html and "<script" in html  # a real saved page, not bare text


def test_corpus_fits_the_embedded_window(docs, tokenizer):
    total = sum(len(tokenizer(squash(text))["input_ids"]) for text in docs.values())
    assert 4000 <= total <= 7000, f"corpus is {total} tokens; it must stay 4-7k to fit an 8k window with a question"


def test_questions_follow_the_benchmark_layout(questions, docs):
    ids = [q["id"] for q in questions]
    assert len(ids) == len(set(ids)), "duplicate ids"
    for q in questions:
        assert set(q) == FIELDS, f"{q['id']}: fields {sorted(set(q) ^ FIELDS)}"
        assert q["type"] == "qa"
        assert q["question"].strip().endswith("?")
        assert q["answers"] and all(isinstance(a, str) and a.strip() for a in q["answers"]), q["id"]
        assert q["docs"] and all(d in docs for d in q["docs"]), f"{q['id']}: unknown doc in {q['docs']}"
        assert len(set(q["docs"])) == len(q["docs"]) == q["hops"], q["id"]
        assert q["tags"] and all(isinstance(t, str) for t in q["tags"]), q["id"]
    hops = Counter(q["hops"] for q in questions)
    assert hops[1] >= 60 and hops[2] >= 20, hops
    for q in questions:
        if q["hops"] == 2:
            assert {"bridge", "comparison"} & set(q["tags"]), f"{q['id']}: a two-hop question says how it combines"


def test_every_answer_occurs_in_its_documents(questions, docs):
    for q in questions:
        text = squash(" ".join(docs[d] for d in q["docs"])).lower()
        assert any(squash(a).lower() in text for a in q["answers"]), f"{q['id']}: no answer of {q['answers']} in {q['docs']}"


def test_questions_do_not_quote_the_documents(questions, docs):
    corpus = squash(" ".join(docs.values())).lower()
    for q in questions:
        assert squash(q["question"]).lower().rstrip("?") not in corpus, f"{q['id']} appears verbatim in the corpus"
        shared = ngrams(words(q["question"]), LEAK_NGRAM) & ngrams(words(" ".join(docs[d] for d in q["docs"])), LEAK_NGRAM)
        assert not shared, f"{q['id']} copies {[' '.join(g) for g in shared]} from its documents"


def test_general_knowledge_set_is_well_formed():
    from importlib.resources import files

    data = files("engrain") / "data"
    rows = [json.loads(line) for line in (data / "general_qa.jsonl").read_text(encoding="utf-8").splitlines() if line]
    assert len(rows) == 120
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["question"].lower() for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == FIELDS and r["type"] == "qa", r["id"]
        assert r["docs"] == [] and r["hops"] == 0 and r["tags"] == ["general"], r["id"]
        assert r["answers"] and all(a.strip() for a in r["answers"]), r["id"]
    n_words = len((data / "general_text.txt").read_text(encoding="utf-8").split())
    assert 1800 <= n_words <= 2500, n_words

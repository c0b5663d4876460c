"""Ingestion: parsers, chunking, incremental re-ingest and every kind of bad input, on real files made here."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from engrain.config import IngestConfig
from engrain.corpus.chunking import chunk_text, token_starts
from engrain.corpus.ingest import ingest
from engrain.corpus.schema import read_chunks, read_documents
from engrain.errors import EngrainError
from engrain.workspace import Workspace

PARAGRAPH = ("The orbital station Kestrel was founded in 2091 by the Lunar Trade Guild. It hosts forty crew members "
             "who rotate every six months. Its reactor, called Ember, produces 12 megawatts. ")


def make_pdf(text_pages: list[str | None], encrypt: bool = False) -> bytes:
    """A real PDF: pages with a text layer (fpdf2), pages without one (None: a blank page), optionally encrypted."""
    from fpdf import FPDF
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    for text in text_pages:
        if text is None:
            writer.add_blank_page(595, 842)
            continue
        pdf = FPDF()
        pdf.add_page()
        pdf.set_font("Helvetica", size=11)
        pdf.multi_cell(0, 6, text)
        writer.add_page(PdfReader(io.BytesIO(bytes(pdf.output()))).pages[0])
    if encrypt:
        writer.encrypt(user_password="secret", owner_password="owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def make_docx(path: Path) -> None:
    import docx

    d = docx.Document()
    d.add_heading("Station handbook", level=1)
    d.add_paragraph("Visitors must register at the airlock.")
    d.add_heading("Reactor", level=2)
    d.add_paragraph("The reactor Ember is inspected every 30 days.")
    table = d.add_table(rows=2, cols=2)
    table.cell(0, 0).text, table.cell(0, 1).text = "Deck", "Use"
    table.cell(1, 0).text, table.cell(1, 1).text = "C", "Hydroponics"
    d.save(path)


def good_folder(root: Path) -> Path:
    docs = root / "docs"
    (docs / "guides").mkdir(parents=True)
    (docs / "kestrel.txt").write_text(PARAGRAPH * 3, encoding="utf-8")
    (docs / "guides" / "deck.md").write_text(
        "# Decks\n\nIntro to the decks.\n\n## Deck C\n\nDeck C grows tomatoes.\n\n### Lighting\n\n"
        "Lamps run 18 hours a day.\n", encoding="utf-8")
    (docs / "page.html").write_text(
        "<html><head><title>Crew</title><script>var secret = 'menu-js';</script></head><body>"
        "<nav><a href='/'>Home</a><a href='/x'>NavLinkText</a></nav><main><h1>Crew roster</h1>"
        "<p>Commander Ilse Varga leads the crew.</p></main><footer>Copyright footer</footer></body></html>",
        encoding="utf-8")
    return docs


def run(docs: Path, ws: Workspace, tokenizer, **cfg) -> dict:
    return ingest(docs, ws, IngestConfig(**cfg), tokenizer=tokenizer).to_dict()


def by_id(ws: Workspace, include_removed: bool = False) -> dict:
    return {d.id: d for d in read_documents(ws, include_removed=include_removed)}


# --------------------------------------------------------------------------------------------------
# Good input
# --------------------------------------------------------------------------------------------------


def test_a_plain_text_title_line_is_the_documents_title(tmp_path, tokenizer):
    """A short first line above the text (as Wikipedia exports and many notes have it) titles the document, and
    so names its subject in synthetic items, instead of the file's slug; a first sentence does not."""
    from engrain.synth.base import document_subject

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "sq1-black-death.txt").write_text("Black Death\n\n" + PARAGRAPH, encoding="utf-8")
    (docs / "notes.txt").write_text("The harbour opened in 1901.\n\n" + PARAGRAPH, encoding="utf-8")
    (docs / "one-line.txt").write_text("Black Death", encoding="utf-8")
    ws = Workspace.at(tmp_path / "ws")
    run(docs, ws, tokenizer)
    documents = by_id(ws)
    assert documents["sq1-black-death"].title == "Black Death"
    assert documents["notes"].title == "notes" and documents["one-line"].title == "one-line"  # the file's stem
    chunk = next(c for c in read_chunks(ws) if c.doc_id == "sq1-black-death")
    assert document_subject(documents["sq1-black-death"], chunk) == "Black Death"


def test_a_new_parser_version_parses_unchanged_files_again(tmp_path, tokenizer, monkeypatch):
    from engrain.corpus import ingest as ingest_module
    from engrain.corpus.parsers import text

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "sq1-black-death.txt").write_text("Black Death\n\n" + PARAGRAPH, encoding="utf-8")
    ws = Workspace.at(tmp_path / "ws")
    with monkeypatch.context() as m:  # a workspace ingested before plain-text titles
        m.setattr(text, "title_line", lambda blocks: "")
        m.setattr(ingest_module, "PARSER_VERSION", ingest_module.PARSER_VERSION - 1)
        run(docs, ws, tokenizer)
    assert by_id(ws)["sq1-black-death"].title == "sq1-black-death"
    run(docs, ws, tokenizer)
    assert by_id(ws)["sq1-black-death"].title == "Black Death"


def test_formats_offsets_and_heading_paths(tmp_path, tokenizer):
    docs = good_folder(tmp_path)
    (docs / "report.pdf").write_bytes(make_pdf(["Quarterly report. Oxygen reserves rose by 4 percent."]))
    make_docx(docs / "handbook.docx")
    (docs / "faq.jsonl").write_text(
        json.dumps({"id": "q1", "body": "Docking fees are 30 credits."}) + "\n"
        + json.dumps({"id": "q2", "body": "The bar opens at 19:00."}) + "\n", encoding="utf-8")
    (docs / "export.json").write_text(json.dumps([{"id": "x/1", "body": "Export one."}, {"body": "Export two."}]),
                                      encoding="utf-8")
    ws = Workspace.at(tmp_path / "ws")
    s = run(docs, ws, tokenizer, json_text_field="body", chunk_tokens=64, chunk_overlap=8)
    assert s["exit_code"] == 0 and not s["failed"]
    documents = by_id(ws)
    assert set(documents) == {"kestrel", "guides/deck", "page", "report", "handbook", "faq/q1", "faq/q2",
                              "export/x-1", "export/1"}
    assert documents["faq/q2"].text == "The bar opens at 19:00." and documents["faq/q2"].format == "jsonl"
    html = documents["page"].text
    assert "Commander Ilse Varga" in html and "NavLinkText" not in html and "menu-js" not in html
    assert "Copyright footer" not in html and documents["page"].title == "Crew"
    assert "Hydroponics" in documents["handbook"].text and "Deck | Use" in documents["handbook"].text
    assert "Oxygen reserves" in documents["report"].text and documents["report"].meta["pages"] == 1
    chunks = read_chunks(ws)
    for c in chunks:  # offsets point into the document text exactly
        assert documents[c.doc_id].text[c.start:c.end] == c.text
        assert c.tokens <= 64
    paths = {c.text.split("\n")[-1]: c.heading_path for c in chunks if c.doc_id == "guides/deck"}
    assert paths["Lamps run 18 hours a day."] == ["Decks", "Deck C", "Lighting"]
    assert ["Station handbook", "Reactor"] in [c.heading_path for c in chunks if c.doc_id == "handbook"]
    assert s["tokens"] == sum(d.tokens for d in documents.values()) > 0
    assert s["chunks"] == len(chunks)


def test_chunking_respects_size_overlap_and_sentences(tokenizer):
    text = " ".join(f"Sentence number {i} talks about topic {i * 7}." for i in range(120))
    starts = token_starts(tokenizer, [text])[0]
    chunks = chunk_text("d", text, [], starts, chunk_tokens=50, overlap=24)
    assert len(chunks) > 5
    for a, b in zip(chunks, chunks[1:]):
        assert a.tokens <= 50 and a.text.endswith(".")  # ends at a sentence boundary
        assert b.start < a.end  # consecutive chunks overlap ...
        assert len(tokenizer(text[b.start:a.end], add_special_tokens=False)["input_ids"]) <= 24 + 2  # ... a little
    assert chunks[-1].end == len(text)
    # a sentence longer than a chunk is cut at token boundaries, without a tiny tail
    long = "word " * 300
    pieces = chunk_text("d", long.strip(), [], token_starts(tokenizer, [long.strip()])[0], 64, 0)
    assert all(p.tokens <= 64 for p in pieces) and min(p.tokens for p in pieces) > 32


def test_chunk_ids_stable_and_incremental_reingest(tmp_path, tokenizer):
    docs = good_folder(tmp_path)
    for i in range(5):
        (docs / f"note{i}.txt").write_text(f"Note {i}. " + PARAGRAPH, encoding="utf-8")
    ws = Workspace.at(tmp_path / "ws")
    first = run(docs, ws, tokenizer, chunk_tokens=48, chunk_overlap=8)
    assert first["ingested"] == 8 and len(first["new"]) == 8
    chunks1 = {c.id: c for c in read_chunks(ws)}

    again = run(docs, ws, tokenizer, chunk_tokens=48, chunk_overlap=8)  # nothing changed
    assert again["ingested"] == 0 and again["unchanged"] == 8 and again["chunks_new"] == 0
    assert {c.id: c.sha256 for c in read_chunks(ws)} == {k: c.sha256 for k, c in chunks1.items()}

    # touch one (same bytes), modify one, delete one, add one
    st = (docs / "note0.txt").stat()
    os.utime(docs / "note0.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    (docs / "note1.txt").write_text("Note 1 was rewritten. The station has a new garden.", encoding="utf-8")
    (docs / "note2.txt").unlink()
    (docs / "fresh.md").write_text("# Fresh\n\nA new file about the garden.", encoding="utf-8")
    third = run(docs, ws, tokenizer, chunk_tokens=48, chunk_overlap=8)
    assert third["ingested"] == 2 and third["unchanged"] == 6
    assert third["new"] == ["fresh"] and third["changed"] == ["note1"] and third["removed"] == ["note2"]
    everything = by_id(ws, include_removed=True)
    assert everything["note2"].status == "removed" and everything["note2"].change == "removed"
    assert everything["note0"].change == "unchanged" and everything["note1"].change == "changed"
    assert "note2" not in by_id(ws)
    chunks3 = {c.id: c for c in read_chunks(ws)}
    assert not any(c.doc_id == "note2" for c in chunks3.values())
    kept = [k for k, c in chunks1.items() if c.doc_id not in ("note1", "note2")]
    assert all(k in chunks3 for k in kept)  # untouched documents keep their chunk ids

    # changing the chunk size re-chunks everything without re-parsing any file
    fourth = run(docs, ws, tokenizer, chunk_tokens=96, chunk_overlap=8)
    assert fourth["ingested"] == 0 and fourth["tokens_processed"] == fourth["tokens"]


def test_a_crashed_run_resumes_without_parsing_again(tmp_path, tokenizer, monkeypatch):
    import engrain.corpus.ingest as ingest_module
    import engrain.corpus.parse_pool as parse_module

    docs = good_folder(tmp_path)
    ws = Workspace.at(tmp_path / "ws")
    parsed = []
    real_parse = parse_module._parse_one
    monkeypatch.setattr(parse_module, "_parse_one", lambda *a: parsed.append(a[1]) or real_parse(*a))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest_module, "chunk_text", crash)  # dies after parsing, before writing the corpus
    with pytest.raises(KeyboardInterrupt):
        run(docs, ws, tokenizer)
    assert len(parsed) == 3 and not ws.documents_path.exists()
    monkeypatch.setattr(ingest_module, "chunk_text", chunk_text)
    (docs / "kestrel.txt").write_text("Changed while we were down.", encoding="utf-8")
    s = run(docs, ws, tokenizer)
    assert s["resumed"] == 2 and len(parsed) == 4  # only the changed file was parsed again
    assert set(by_id(ws)) == {"kestrel", "guides/deck", "page"} and by_id(ws)["kestrel"].text.startswith("Changed")
    assert not (ws.corpus_dir / "ingest-partial.jsonl").exists()


def test_identical_documents_stored_once(tmp_path, tokenizer):
    docs = good_folder(tmp_path)
    (docs / "copies").mkdir()
    (docs / "copies" / "kestrel-copy.txt").write_bytes((docs / "kestrel.txt").read_bytes())
    (docs / "copies" / "kestrel-spaced.txt").write_bytes((docs / "kestrel.txt").read_bytes().replace(b" ", b"  "))
    ws = Workspace.at(tmp_path / "ws")
    s = run(docs, ws, tokenizer)
    assert {d["path"] for d in s["duplicates"]} == {"copies/kestrel-copy.txt", "copies/kestrel-spaced.txt"}
    documents = by_id(ws)
    assert "copies/kestrel-copy" not in documents
    assert sorted(documents["kestrel"].aliases) == ["copies/kestrel-copy.txt", "copies/kestrel-spaced.txt"]
    # the original goes away: the copy takes over the content, and nothing is re-parsed
    (docs / "kestrel.txt").unlink()
    s = run(docs, ws, tokenizer)
    assert s["removed"] == ["kestrel"] and "copies/kestrel-copy" in by_id(ws)


def test_encodings(tmp_path, tokenizer):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "utf8.txt").write_text("Ženeva, café, 東京 and naïve text.", encoding="utf-8")
    (docs / "bom16.txt").write_bytes("Größe of the Ærø bridge: 12 km.".encode("utf-16"))
    (docs / "latin.txt").write_bytes("Le café est déjà très cher à Noël. Ça coûte 3 €.".encode("cp1252"))
    (docs / "cyrillic.txt").write_bytes("Привет, это тестовый текст на русском языке для проверки.".encode("cp1251"))
    ws = Workspace.at(tmp_path / "ws")
    s = run(docs, ws, tokenizer)
    assert s["exit_code"] == 0, s
    d = by_id(ws)
    assert d["utf8"].text == "Ženeva, café, 東京 and naïve text."
    assert d["bom16"].text == "Größe of the Ærø bridge: 12 km." and d["bom16"].meta["encoding"] == "utf-16-le"
    assert d["latin"].text == "Le café est déjà très cher à Noël. Ça coûte 3 €."
    assert d["cyrillic"].text.startswith("Привет, это тестовый текст")


def test_symlinks_leaving_the_folder_are_not_followed(tmp_path, tokenizer):
    docs = good_folder(tmp_path)
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "private.txt").write_text("Outside text that must not be read.", encoding="utf-8")
    (docs / "escape.txt").symlink_to(outside / "private.txt")
    (docs / "escape-dir").symlink_to(outside, target_is_directory=True)
    (docs / "inside-link.txt").symlink_to(docs / "kestrel.txt")
    (docs / "loop").symlink_to(docs, target_is_directory=True)
    ws = Workspace.at(tmp_path / "ws")
    s = run(docs, ws, tokenizer)
    skipped = {x["path"]: x["reason"] for x in s["skipped"]}
    assert "symlink" in skipped["escape.txt"] and "symlink" in skipped["escape-dir"]
    assert not any("Outside text" in d.text for d in read_documents(ws))
    assert s["exit_code"] == 0


def test_include_exclude_globs(tmp_path, tokenizer):
    docs = good_folder(tmp_path)
    (docs / "drafts").mkdir()
    (docs / "drafts" / "wip.md").write_text("# WIP\n\nNot ready.", encoding="utf-8")
    ws = Workspace.at(tmp_path / "ws")
    s = run(docs, ws, tokenizer, exclude=["drafts"], include=["*.md", "*.txt"])
    assert set(by_id(ws)) == {"kestrel", "guides/deck"} and s["excluded"] == 1  # drafts/ is not even walked


# --------------------------------------------------------------------------------------------------
# Bad input: each reported by name with a reason, the rest ingested, nothing already there lost
# --------------------------------------------------------------------------------------------------

BAD_FILES = {
    "corrupt.pdf": (lambda: b"%PDF-1.4\n" + bytes(range(256)) * 4, "corrupt PDF"),
    "truncated.pdf": (lambda: make_pdf(["Some text here."])[:300], "corrupt PDF"),
    "locked.pdf": (lambda: make_pdf(["Secret launch codes."], encrypt=True), "encrypted PDF"),
    "scan.pdf": (lambda: make_pdf([None, None]), "no text layer"),
    "binary.txt": (lambda: bytes(range(256)) * 8, "binary"),
    "blank.md": (lambda: b" \n\t\n   \n", "empty"),
    "zero.txt": (lambda: b"", "empty"),
    "fake.docx": (lambda: _zip({"hello.txt": "not word"}), "not a Word document"),
    "notzip.docx": (lambda: b"PK but not really a zip", "not a Word document"),
    "broken.jsonl": (lambda: b'{"text": "fine"}\n{not json\n', "not valid JSON"),
    "big.txt": (lambda: b"A big file. " * 20_000, "size limit"),
}


def _zip(files: dict) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return out.getvalue()


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_each_bad_file_is_reported_and_the_rest_ingested(tmp_path, tokenizer, name):
    docs = good_folder(tmp_path)
    make, reason = BAD_FILES[name]
    (docs / name).write_bytes(make())
    ws = Workspace.at(tmp_path / "ws")
    s = run(docs, ws, tokenizer, max_file_mb=0.1)
    assert [f["path"] for f in s["failed"]] == [name]
    assert reason.lower() in s["failed"][0]["reason"].lower(), s["failed"]
    assert s["exit_code"] == 1 and set(by_id(ws)) == {"kestrel", "guides/deck", "page"}


def test_pdf_with_some_pages_without_text_is_ingested_with_a_warning(tmp_path, tokenizer):
    docs = good_folder(tmp_path)
    (docs / "mixed.pdf").write_bytes(make_pdf(["Page one has text.", None, "Page three too."]))
    ws = Workspace.at(tmp_path / "ws")
    s = run(docs, ws, tokenizer)
    assert s["exit_code"] == 0
    assert s["warnings"] == [{"path": "mixed.pdf", "message": "no text layer on page(s) 2 of 3"}]
    assert by_id(ws)["mixed"].meta["pages_without_text"] == [2]


def test_invalid_utf8_is_repaired_in_place_and_reported(tmp_path, tokenizer):
    docs = good_folder(tmp_path)
    (docs / "damaged.txt").write_bytes("Café au lait costs ".encode() + b"\xc3\x28" + " 4 crédits.".encode())
    ws = Workspace.at(tmp_path / "ws")
    s = run(docs, ws, tokenizer)
    assert [w["path"] for w in s["warnings"]] == ["damaged.txt"] and "invalid UTF-8" in s["warnings"][0]["message"]
    assert by_id(ws)["damaged"].text == "Café au lait costs \ufffd( 4 crédits."  # accents intact, not mojibake
    # mostly garbage is refused, not "repaired"
    (docs / "damaged.txt").write_bytes("é".encode() + b"\xc3" * 200)
    s = run(docs, ws, tokenizer)
    assert s["failed"][0]["path"] == "damaged.txt" and "invalid UTF-8" in s["failed"][0]["reason"]


def test_a_failing_rerun_keeps_previous_good_documents(tmp_path, tokenizer):
    docs = good_folder(tmp_path)
    (docs / "report.pdf").write_bytes(make_pdf(["Oxygen reserves rose by 4 percent."]))
    ws = Workspace.at(tmp_path / "ws")
    assert run(docs, ws, tokenizer)["exit_code"] == 0
    before = by_id(ws)
    (docs / "report.pdf").write_bytes(b"%PDF-1.4 garbage now")  # the file gets damaged
    (docs / "kestrel.txt").write_bytes(b"\x00\x01\x02" * 50)
    s = run(docs, ws, tokenizer)
    assert s["exit_code"] == 1 and sorted(f["path"] for f in s["failed"]) == ["kestrel.txt", "report.pdf"]
    after = by_id(ws)
    assert set(after) == set(before)  # nothing lost
    assert after["report"].text == before["report"].text and "corrupt PDF" in after["report"].error
    assert {c.doc_id for c in read_chunks(ws)} >= {"report", "kestrel"}
    # everything failing at once writes nothing and says so
    for f in docs.rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00\x00")
    s = run(docs, ws, tokenizer)
    assert s["exit_code"] == 1 and set(by_id(ws)) == set(before)  # last good versions kept
    fresh_ws = Workspace.at(tmp_path / "ws2")
    s = run(docs, fresh_ws, tokenizer)
    assert s["exit_code"] == 2 and not s["written"] and not fresh_ws.documents_path.exists()


def test_folder_without_supported_files_and_missing_path(tmp_path, tokenizer):
    docs = tmp_path / "pics"
    docs.mkdir()
    (docs / "a.png").write_bytes(b"\x89PNG")
    ws = Workspace.at(tmp_path / "ws")
    with pytest.raises(EngrainError, match="No supported documents"):
        ingest(docs, ws, tokenizer=tokenizer)
    with pytest.raises(EngrainError, match="does not exist"):
        ingest(tmp_path / "nope", ws, tokenizer=tokenizer)
    assert not ws.root.exists()


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "300"}  # rich wraps messages at the terminal width
    return subprocess.run([sys.executable, "-c", "from engrain.cli import main; main()", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env=env)


def test_cli_json_and_exit_status(tmp_path):
    docs = good_folder(tmp_path)
    (docs / "zero.txt").write_bytes(b"")
    ws = tmp_path / "ws"
    r = _cli("ingest", str(docs), "-w", str(ws), "--chunk-tokens", "64", "--chunk-overlap", "0", "--json",
             cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    assert out["failed"] == [{"path": "zero.txt", "reason": "empty file (0 bytes)"}]
    assert out["documents"] == 3 and out["chunks"] > 0
    assert "chunk_tokens: 64" in (ws / "engrain.yaml").read_text()
    (docs / "zero.txt").unlink()
    r = _cli("ingest", str(docs), "-w", str(ws), "--json", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["unchanged"] == 3
    r = _cli("ingest", str(tmp_path / "missing"), "-w", str(ws), cwd=tmp_path)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    # An option the command does not have is a usage error naming it, not "a bug in engrain".
    r = _cli("ingest", str(docs), "-w", str(ws), "--config", "x.yaml", cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "No such option: --config" in out and "bug in engrain" not in out

"""Render the example corpus's PDF and Word documents from their Markdown sources.

The example corpus (``examples/acme``) ships one PDF and one DOCX so that ingestion meets real binary files, yet
their text is written by the project in ``examples/acme/sources/<doc-id>.md``. The sources use a small Markdown
subset: ``# title``, ``## heading``, plain paragraphs (separated by blank lines) and pipe tables. Rendering is
deterministic (fixed dates and metadata, fixed zip timestamps), so re-running reproduces the committed files
byte for byte and a diff shows only real text changes.

Rebuild after editing a source:  python -m engrain.example_corpus examples/acme
"""

from __future__ import annotations

import io
import sys
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import EngrainError

# Every generated file claims this moment, so output does not depend on when it was built.
FIXED_DATE = datetime(2024, 1, 15, 9, 0, 0, tzinfo=timezone.utc)
AUTHOR = "Kelderwick Marine Sensors"
PRODUCER = "engrain example corpus"

# Which source becomes which kind of file.
BINARY_DOCS = {"annual-report-2023": "pdf", "staff-handbook": "docx"}


@dataclass(frozen=True)
class Block:
    kind: str  # "title" | "heading" | "para" | "table"
    text: str = ""
    rows: tuple[tuple[str, ...], ...] = ()


def parse_source(text: str, origin: str = "<source>") -> list[Block]:
    """Split the Markdown subset into blocks; anything outside the subset is an error naming the line."""
    blocks: list[Block] = []
    para: list[str] = []
    table: list[tuple[str, ...]] = []

    def flush() -> None:
        if para:
            blocks.append(Block("para", " ".join(para)))
            para.clear()
        if table:
            blocks.append(Block("table", rows=tuple(table)))
            table.clear()

    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            flush()
        elif line.startswith("|"):
            if para:
                flush()
            cells = tuple(c.strip() for c in line.strip("|").split("|"))
            if all(set(c) <= set("-: ") and c for c in cells):
                continue  # the |---|---| separator under the header row
            if table and len(cells) != len(table[0]):
                raise EngrainError(f"{origin}:{lineno}: table row has {len(cells)} cells, the header has "
                                   f"{len(table[0])}.", hint="Give every row of a table the same number of cells.")
            table.append(cells)
        elif line.startswith("#"):
            flush()
            level = len(line) - len(line.lstrip("#"))
            if level > 2:
                raise EngrainError(f"{origin}:{lineno}: only '#' and '##' headings are supported.",
                                   hint="Use '##' for every section heading.")
            blocks.append(Block("title" if level == 1 else "heading", line[level:].strip()))
        else:
            if table:
                flush()
            para.append(line)
    flush()
    return blocks


def plain_text(blocks: list[Block]) -> str:
    """The words a reader sees, one block (or table row) per line: what extraction must give back."""
    lines: list[str] = []
    for block in blocks:
        if block.kind == "table":
            lines.extend(" ".join(row) for row in block.rows)
        else:
            lines.append(block.text)
    return "\n".join(lines)


def read_source(path: Path) -> list[Block]:
    try:
        return parse_source(Path(path).read_text(encoding="utf-8"), origin=str(path))
    except OSError as exc:
        raise EngrainError(f"Cannot read the example source {path}: {exc}",
                           hint="Run from a checkout that has examples/acme/sources/.") from exc


def render_pdf(blocks: list[Block], out: Path) -> None:
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_creation_date(FIXED_DATE)
    pdf.set_producer(PRODUCER)
    pdf.set_creator(PRODUCER)
    pdf.set_author(AUTHOR)
    title = next((b.text for b in blocks if b.kind == "title"), out.stem)
    pdf.set_title(title)
    pdf.set_margins(20, 20, 20)
    pdf.add_page()
    for block in blocks:
        for text in [block.text, *(c for row in block.rows for c in row)]:
            try:
                text.encode("latin-1")
            except UnicodeEncodeError as exc:  # the built-in PDF fonts cover Latin-1 only
                raise EngrainError(f"{out.stem}: '{text[:40]}...' has a character outside Latin-1.",
                                   hint="Write the PDF source with plain Latin-1 punctuation.") from exc
        if block.kind == "title":
            pdf.set_font("Helvetica", "B", 16)
            pdf.multi_cell(0, 8, block.text, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(4)
        elif block.kind == "heading":
            pdf.ln(2)
            pdf.set_font("Helvetica", "B", 12)
            pdf.multi_cell(0, 7, block.text, new_x="LMARGIN", new_y="NEXT")
        elif block.kind == "para":
            pdf.set_font("Helvetica", "", 11)
            pdf.multi_cell(0, 5.5, block.text, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(2)
        else:
            pdf.set_font("Helvetica", "", 10)
            with pdf.table() as table:
                for row in block.rows:
                    cells = table.row()
                    for cell in row:
                        cells.cell(cell)
            pdf.ln(2)
    out.write_bytes(bytes(pdf.output()))


def render_docx(blocks: list[Block], out: Path) -> None:
    from docx import Document

    doc = Document()
    props = doc.core_properties
    props.author = AUTHOR
    props.last_modified_by = AUTHOR
    props.title = next((b.text for b in blocks if b.kind == "title"), out.stem)
    props.created = FIXED_DATE.replace(tzinfo=None)
    props.modified = FIXED_DATE.replace(tzinfo=None)
    props.revision = 1
    for block in blocks:
        if block.kind == "title":
            doc.add_heading(block.text, level=0)
        elif block.kind == "heading":
            doc.add_heading(block.text, level=1)
        elif block.kind == "para":
            doc.add_paragraph(block.text)
        else:
            table = doc.add_table(rows=len(block.rows), cols=len(block.rows[0]))
            table.style = "Table Grid"
            for r, row in enumerate(block.rows):
                for c, text in enumerate(row):
                    cell = table.cell(r, c)
                    cell.text = text
                    if r == 0:
                        for run in cell.paragraphs[0].runs:
                            run.bold = True
    buffer = io.BytesIO()
    doc.save(buffer)
    out.write_bytes(_fixed_zip(buffer.getvalue()))


def _fixed_zip(data: bytes) -> bytes:
    """Rewrite a zip with every entry stamped FIXED_DATE: python-docx stamps entries with the current time."""
    stamp = FIXED_DATE.timetuple()[:6]
    src = zipfile.ZipFile(io.BytesIO(data))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            info = zipfile.ZipInfo(item.filename, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            dst.writestr(info, src.read(item.filename))
    return buffer.getvalue()


def build_binary_docs(out_dir: str | Path, sources_dir: str | Path | None = None) -> list[Path]:
    """Render every source in BINARY_DOCS into ``out_dir`` (default sources: ``out_dir/../sources``)."""
    out_dir = Path(out_dir)
    sources_dir = Path(sources_dir) if sources_dir else out_dir.parent / "sources"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for doc_id, kind in BINARY_DOCS.items():
        blocks = read_source(sources_dir / f"{doc_id}.md")
        out = out_dir / f"{doc_id}.{kind}"
        tmp = out.with_name(f".{out.name}.part")  # a crash never leaves a half-written document behind
        (render_pdf if kind == "pdf" else render_docx)(blocks, tmp)
        tmp.replace(out)
        written.append(out)
    return written


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "examples/acme")
    for path in build_binary_docs(root / "docs", root / "sources"):
        print(path)

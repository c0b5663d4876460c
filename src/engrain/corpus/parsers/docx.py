"""Word .docx: paragraphs (headings from their styles) and tables, in document order."""

from __future__ import annotations

import io
import re
import zipfile

from .blocks import Block, ParseError, Parsed, clean

_HEADING_STYLE = re.compile(r"^heading\s*([1-9])$", re.I)


def parse_docx(data: bytes) -> Parsed:
    import docx
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = set(z.namelist())
    except zipfile.BadZipFile as exc:
        raise ParseError("not a Word document: not a zip archive (corrupt, or an old .doc renamed?)") from exc
    if "word/document.xml" not in names:
        raise ParseError("not a Word document: a zip archive without word/document.xml")
    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as exc:  # python-docx raises KeyError/ValueError/lxml errors on damaged packages
        raise ParseError(f"corrupt Word document ({type(exc).__name__}: {exc})") from exc
    # Style names by id, read once: python-docx's per-paragraph ``.style`` lookup scans every style each time.
    style_names = {s.style_id: s.name or "" for s in document.styles}
    blocks: list[Block] = []
    for element in document.element.body.iterchildren():
        tag = element.tag.rsplit("}", 1)[-1]
        if tag == "p":
            paragraph = Paragraph(element, document)
            text = clean(paragraph.text)
            if not text:
                continue
            ppr = element.pPr
            style_id = ppr.pStyle.val if ppr is not None and ppr.pStyle is not None else None
            style = style_names.get(style_id, "") if style_id else ""
            m = _HEADING_STYLE.match(style)
            level = int(m.group(1)) if m else (1 if style.lower() == "title" else 0)
            blocks.append(Block(text, heading=min(level, 6)))
        elif tag == "tbl":
            rows = []
            for row in Table(element, document).rows:
                cells: list[str] = []
                for cell in row.cells:
                    text = clean(cell.text, keep_lines=False)
                    if text and (not cells or cells[-1] != text):  # merged cells repeat their text
                        cells.append(text)
                if cells:
                    rows.append(" | ".join(cells))
            if rows:
                blocks.append(Block("\n".join(rows)))
    if not blocks:
        raise ParseError("Word document has no text")
    title = clean(document.core_properties.title or "", keep_lines=False)
    if not title:
        title = next((b.text for b in blocks if b.heading), "")
    return Parsed(blocks, title=title)

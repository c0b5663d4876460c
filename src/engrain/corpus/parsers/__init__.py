"""One parser per file format. Each turns a file's bytes into ``Parsed``: blocks of text, a title, metadata.

A parser never decides how the text is chunked; it only says what is a heading and what is a paragraph.
``assemble`` joins the blocks into the document text (paragraphs separated by a blank line) and records where
each heading starts, so chunking can keep a heading path without parsing anything again.

A file a parser cannot read raises ``ParseError`` with a reason a user can act on ("encrypted PDF", ...).
"""

from __future__ import annotations

from .blocks import Assembled, Block, ParseError, Parsed, assemble, clean, paragraphs

__all__ = ["Assembled", "Block", "FORMATS", "ParseError", "Parsed", "assemble", "clean", "format_of", "paragraphs", "parse"]

# file extension -> format name; the parser modules are imported lazily so a run only pays for what it reads
FORMATS = {".txt": "txt", ".text": "txt", ".md": "md", ".markdown": "md", ".html": "html", ".htm": "html",
           ".pdf": "pdf", ".docx": "docx", ".jsonl": "jsonl", ".json": "json"}


def format_of(name: str) -> str | None:
    dot = name.rfind(".")
    return FORMATS.get(name[dot:].lower()) if dot > 0 else None


def parse(data: bytes, fmt: str, *, name: str = "", json_text_field: str = "text") -> list[Parsed]:
    """Parse one file's bytes; a list because a .jsonl export holds many documents. Raises ParseError."""
    if not data.strip():
        raise ParseError("empty file" if data else "empty file (0 bytes)")
    if fmt in ("txt", "md"):
        from .text import parse_text

        return [parse_text(data, markdown=fmt == "md")]
    if fmt == "html":
        from .html import parse_html

        return [parse_html(data)]
    if fmt == "pdf":
        from .pdf import parse_pdf

        return [parse_pdf(data)]
    if fmt == "docx":
        from .docx import parse_docx

        return [parse_docx(data)]
    if fmt in ("jsonl", "json"):
        from .jsonl import parse_json

        return parse_json(data, jsonl=fmt == "jsonl", text_field=json_text_field)
    raise ParseError(f"unsupported format {fmt!r}")

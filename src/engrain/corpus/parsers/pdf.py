"""PDF: the text layer of each page (no OCR). Pages without text are reported, not silently dropped."""

from __future__ import annotations

import io
import logging

from .blocks import Block, ParseError, Parsed, clean, paragraphs


def parse_pdf(data: bytes) -> Parsed:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError, PdfReadError

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # pypdf logs every repaired xref; we report in words
    if not data.lstrip()[:5].startswith(b"%PDF"):
        raise ParseError("not a PDF (no %PDF header): corrupt or wrongly named")
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            # Many PDFs are encrypted only against editing and open with the empty password.
            try:
                ok = reader.decrypt("")
            except (NotImplementedError, DependencyError) as exc:
                raise ParseError(f"encrypted PDF with an unsupported cipher ({exc}); save an unencrypted copy") from exc
            if not ok:
                raise ParseError("encrypted PDF: a password is needed to open it; save an unencrypted copy")
        pages = list(reader.pages)
    except ParseError:
        raise
    except FileNotDecryptedError as exc:
        raise ParseError("encrypted PDF: a password is needed to open it; save an unencrypted copy") from exc
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, OSError, IndexError) as exc:
        raise ParseError(f"corrupt PDF ({type(exc).__name__}: {exc})") from exc
    if not pages:
        raise ParseError("PDF has no pages")
    blocks: list[Block] = []
    empty: list[int] = []
    for number, page in enumerate(pages, 1):
        try:
            text = page.extract_text() or ""
        except Exception as exc:  # pypdf raises many types on damaged content streams; one bad page is not fatal
            text = ""
            logging.getLogger(__name__).debug("page %d: %s", number, exc)
        page_blocks = paragraphs(text)
        if not page_blocks:
            empty.append(number)
        blocks.extend(page_blocks)
    if not blocks:
        raise ParseError(f"no text layer on any of its {len(pages)} page(s) (a scan?); run OCR first")
    title = ""
    try:
        title = clean(str((reader.metadata or {}).get("/Title") or ""), keep_lines=False)
    except Exception:  # broken metadata must not lose a readable document
        pass
    warnings = []
    if empty:
        warnings.append(f"no text layer on page(s) {_ranges(empty)} of {len(pages)}")
    return Parsed(blocks, title=title, meta={"pages": len(pages), "pages_without_text": empty}, warnings=warnings)


def _ranges(numbers: list[int]) -> str:
    out, start = [], numbers[0]
    for prev, cur in zip(numbers, numbers[1:] + [None]):
        if cur != prev + 1:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(out)

"""Plain text and Markdown: decode the bytes (UTF-8, UTF-16/32 with BOM, legacy single-byte), find the blocks."""

from __future__ import annotations

import re

from .blocks import Block, ParseError, Parsed, clean, paragraphs

# (mark, codec that strips it, name we report); UTF-32 first because its little-endian mark starts like UTF-16's
_BOMS = [(b"\xef\xbb\xbf", "utf-8-sig", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32", "utf-32-le"),
         (b"\x00\x00\xfe\xff", "utf-32", "utf-32-be"), (b"\xff\xfe", "utf-16", "utf-16-le"),
         (b"\xfe\xff", "utf-16", "utf-16-be")]
_UTF8_MULTIBYTE = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}")
_BINARY_BYTES = bytes(b for b in range(32) if b not in (9, 10, 12, 13))
# Single-byte code pages we consider when a file is not UTF-8; isolating them keeps the detector from guessing
# exotic multi-byte encodings for short Western text.
_LEGACY = ["cp1252", "cp1250", "cp1251", "cp1253", "cp1254", "cp1257", "koi8_r", "iso8859_15", "mac_roman"]
MAX_BAD_UTF8 = 0.01  # a UTF-8 file with more than this share of invalid bytes is refused, not repaired


def looks_binary(data: bytes) -> bool:
    """Text has (almost) no NUL or other control bytes; executables, images and archives have many."""
    sample = data[:8192]
    if not sample:
        return False
    controls = len(sample) - len(sample.translate(None, _BINARY_BYTES))
    return b"\x00" in sample or controls / len(sample) > 0.02


def decode(data: bytes) -> tuple[str, str, list[str]]:
    """(text, encoding, warnings). Raises ParseError for binary data or hopelessly broken UTF-8."""
    for bom, codec, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(codec), encoding, []
            except UnicodeDecodeError as exc:
                raise ParseError(f"starts with a {encoding} byte-order mark but is not valid {encoding} "
                                 f"(byte {exc.start})") from exc
    if looks_binary(data):
        raise ParseError("binary content, not text (NUL or control bytes); is the file extension wrong?")
    try:
        return data.decode("utf-8"), "utf-8", []
    except UnicodeDecodeError as exc:
        first_bad = exc.start
    if _UTF8_MULTIBYTE.search(data):
        # Valid multi-byte UTF-8 next to invalid bytes: UTF-8 damaged in places. Reading it as a legacy code page
        # would garble every accented letter, so keep UTF-8 and mark the few bad bytes with U+FFFD.
        text = data.decode("utf-8", errors="surrogateescape")
        bad = sum(1 for ch in text if "\udc80" <= ch <= "\udcff")
        if bad > max(1, len(data) * MAX_BAD_UTF8):
            raise ParseError(f"invalid UTF-8: {bad} bad bytes (first at byte {first_bad}); re-save the file as UTF-8")
        text = data.decode("utf-8", errors="replace")
        return text, "utf-8", [f"invalid UTF-8: {bad} byte(s) replaced with U+FFFD (first at byte {first_bad})"]
    from charset_normalizer import from_bytes

    results = list(from_bytes(data, cp_isolation=_LEGACY))
    try:
        western = data.decode("cp1252")
    except UnicodeDecodeError:  # bytes cp1252 leaves undefined
        western = None
    # The detector cannot tell Western code pages apart on short text (it may pick Baltic for French); when
    # Windows-1252 is among its plausible answers, or reads the same, take it: by far the most common legacy case.
    if western is not None and (not results or any(m.encoding in ("cp1252", "iso8859_15") or str(m) == western
                                                   for m in results)):
        return western, "cp1252", []
    if results:
        return str(results[0]), results[0].encoding, []
    return data.decode("latin-1"), "latin-1", []


_ATX = re.compile(r"^(#{1,6})[ \t]+(.*?)[ \t#]*$")
_FENCE = re.compile(r"^(```|~~~)")
_SETEXT = re.compile(r"^(=+|-+)[ \t]*$")


def markdown_blocks(text: str) -> tuple[list[Block], str]:
    """Headings (ATX and setext), fenced code kept whole, paragraphs; YAML front matter gives the title."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    title = ""
    if lines and lines[0].strip() == "---":  # front matter
        for end in range(1, min(len(lines), 200)):
            if lines[end].strip() in ("---", "..."):
                for line in lines[1:end]:
                    if line.lower().startswith("title:"):
                        title = line.split(":", 1)[1].strip().strip("\"'")
                lines = lines[end + 1:]
                break
    blocks: list[Block] = []
    para: list[str] = []

    def flush() -> None:
        if para:
            blocks.append(Block(clean("\n".join(para))))
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        if _FENCE.match(line.strip()):
            flush()
            fence, code = line.strip()[:3], [line]
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence):
                code.append(lines[i])
                i += 1
            code.append(lines[i] if i < len(lines) else fence)
            blocks.append(Block("\n".join(code).strip("\n")))
        elif m := _ATX.match(line):
            flush()
            blocks.append(Block(m.group(2).strip() or m.group(1), heading=len(m.group(1))))
        elif _SETEXT.match(line) and len(para) == 1:
            blocks.append(Block(clean(para[0]), heading=1 if line.lstrip()[0] == "=" else 2))
            para.clear()
        elif not line.strip():
            flush()
        else:
            para.append(line)
        i += 1
    flush()
    if not title:
        title = next((b.text for b in blocks if b.heading), "")
    return blocks, title


_SENTENCE_END = re.compile(r"[.!?:;,]$")


def title_line(blocks: list[Block]) -> str:
    """A plain-text file's first paragraph when it reads as a title: one line of at most 12 words that does not
    end a sentence, with more text after it ("French and Indian War" above the article). Otherwise ""."""
    if len(blocks) < 2:
        return ""
    first = blocks[0].text.strip()
    if "\n" in first or not first or len(first.split()) > 12 or _SENTENCE_END.search(first):
        return ""
    return first


def parse_text(data: bytes, markdown: bool = False) -> Parsed:
    text, encoding, warnings = decode(data)
    if not text.strip():
        raise ParseError("empty file (only whitespace)")
    if markdown:
        blocks, title = markdown_blocks(text)
    else:
        blocks = paragraphs(text)
        title = title_line(blocks)
    if not any(b.text.strip() for b in blocks):
        raise ParseError("empty file (no text after cleaning)")
    return Parsed(blocks, title=title, meta={"encoding": encoding}, warnings=warnings)

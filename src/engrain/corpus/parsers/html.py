"""Saved web pages: the main text, without menus, scripts, cookie banners and footers."""

from __future__ import annotations

import re

from bs4 import BeautifulSoup, Comment, NavigableString, Tag

from .blocks import Block, ParseError, Parsed, clean
from .text import decode

# Elements that never hold the page's own text.
_DROP = {"script", "style", "noscript", "template", "svg", "canvas", "iframe", "object", "embed", "form", "button",
         "select", "input", "textarea", "nav", "menu", "dialog", "head"}
# Page furniture: dropped when the page has a <main>/<article> we can read instead, or by role/class/id.
_FURNITURE = {"header", "footer", "aside"}
_FURNITURE_HINT = re.compile(r"(^|[\s_-])(nav|navbar|menu|sidebar|breadcrumbs?|cookie|banner|footer|skip-link|share|"
                             r"social|advert|ads)([\s_-]|$)", re.I)
_BLOCKS = {"p", "div", "section", "article", "main", "li", "ul", "ol", "dl", "dt", "dd", "blockquote", "pre",
           "table", "tr", "figure", "figcaption", "address", "details", "summary", "hr", "br", "body", "html",
           "h1", "h2", "h3", "h4", "h5", "h6", "header", "footer", "aside", "caption", "tbody", "thead", "tfoot"}
_HEADING = re.compile(r"^h([1-6])$")


def _is_furniture(tag: Tag) -> bool:
    if tag.name in _DROP:
        return True
    role = (tag.get("role") or "").lower()
    if role in ("navigation", "banner", "contentinfo", "search", "complementary", "menu", "menubar"):
        return True
    if tag.get("aria-hidden") == "true" or "display:none" in (tag.get("style") or "").replace(" ", ""):
        return True
    ident = " ".join([tag.get("id") or "", *(tag.get("class") or [])])
    return bool(ident and _FURNITURE_HINT.search(ident)) and tag.name not in ("main", "article", "body")


def _table_text(table: Tag) -> str:
    rows = []
    for tr in table.find_all("tr"):
        cells = [clean(td.get_text(" "), keep_lines=False) for td in tr.find_all(["td", "th"])]
        cells = [c for c in cells if c]
        if cells:
            rows.append(" | ".join(cells))
    return "\n".join(rows)


def _walk(node: Tag, blocks: list[Block], inline: list[str]) -> None:
    """Depth-first: inline text gathers into ``inline`` and becomes a paragraph when a block element starts/ends."""

    def flush() -> None:
        text = clean("".join(inline), keep_lines=False)
        if text:
            blocks.append(Block(text))
        inline.clear()

    for child in node.children:
        if isinstance(child, Comment):
            continue
        if isinstance(child, NavigableString):
            inline.append(str(child))
            continue
        if not isinstance(child, Tag) or _is_furniture(child):
            continue
        name = child.name
        if m := _HEADING.match(name):
            flush()
            text = clean(child.get_text(" "), keep_lines=False)
            if text:
                blocks.append(Block(text, heading=int(m.group(1))))
        elif name == "pre":
            flush()
            text = child.get_text().strip("\n")
            if text.strip():
                blocks.append(Block(text))
        elif name == "table":
            flush()
            text = _table_text(child)
            if text:
                blocks.append(Block(text))
        elif name == "li":
            flush()
            inline.append("- ")
            _walk(child, blocks, inline)
            flush()
        elif name in _BLOCKS:
            flush()
            _walk(child, blocks, inline)
            flush()
        else:
            _walk(child, blocks, inline)
    # the caller flushes what is left


def _join_list_items(blocks: list[Block]) -> list[Block]:
    """Consecutive list items read as one paragraph with a line per item, as in Markdown."""
    out: list[Block] = []
    for block in blocks:
        if (out and not block.heading and not out[-1].heading and block.text.startswith("- ")
                and out[-1].text.split("\n")[-1].startswith("- ")):
            out[-1] = Block(out[-1].text + "\n" + block.text)
        else:
            out.append(block)
    return out


def parse_html(data: bytes) -> Parsed:
    text, encoding, warnings = decode(data) if not data.lstrip().startswith(b"<") else (None, "", [])
    if text is None:
        # Let the parser honour <meta charset>; bytes that are not markup at all still go through our decoder.
        soup = BeautifulSoup(data, "lxml")
        encoding = soup.original_encoding or "utf-8"
    else:
        soup = BeautifulSoup(text, "lxml")
    title_tag = soup.find("title")
    title = clean(title_tag.get_text(" "), keep_lines=False) if title_tag else ""
    for c in soup.find_all(string=lambda s: isinstance(s, Comment)):
        c.extract()
    root = soup.body or soup
    mains = [t for t in root.find_all(["main", "article"]) if not _is_furniture(t)] if root else []
    if not mains:
        mains = root.find_all(attrs={"role": "main"}) if root else []
    if mains:
        # The largest <main>/<article> is the page's own content; everything around it is furniture.
        root = max(mains, key=lambda t: len(t.get_text()))
    else:
        for tag in root.find_all(list(_FURNITURE)):
            tag.decompose()
    blocks: list[Block] = []
    inline: list[str] = []
    _walk(root, blocks, inline)
    rest = clean("".join(inline), keep_lines=False)
    if rest:
        blocks.append(Block(rest))
    blocks = _join_list_items(blocks)
    if not blocks:
        raise ParseError("no readable text in this HTML page (only markup, scripts or navigation)")
    if not title:
        title = next((b.text for b in blocks if b.heading), "")
    return Parsed(blocks, title=title, meta={"encoding": encoding}, warnings=warnings)

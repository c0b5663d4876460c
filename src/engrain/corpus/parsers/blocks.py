"""What every parser returns: blocks of text with heading levels, a title and metadata, and the helpers that clean
and assemble them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


class ParseError(Exception):
    """This file cannot be turned into text; the message says why, in words for the user."""


@dataclass
class Block:
    text: str
    heading: int = 0  # 0: a paragraph; 1..6: a heading of that level


@dataclass
class Parsed:
    blocks: list[Block]
    title: str = ""
    key: str = ""  # for formats with several documents per file (jsonl): the record's key, else ""
    meta: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Assembled:
    text: str
    headings: list[list]  # [start_char, level, title], in order


_SPACES = re.compile(r"[ \t\f\v\u00a0\u2000-\u200b\u3000]+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufeff]")
_BLANK_LINES = re.compile(r"\n\s*\n+")


def clean(text: str, keep_lines: bool = True) -> str:
    """Normalise whitespace without changing words: one space inside lines, no control characters."""
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    if not keep_lines:
        return _SPACES.sub(" ", text.replace("\n", " ")).strip()
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def paragraphs(text: str) -> list[Block]:
    """Plain text split at blank lines into paragraph blocks."""
    return [Block(p) for p in clean(text).split("\n\n") if p.strip()]


def assemble(blocks: list[Block]) -> Assembled:
    parts, headings, pos = [], [], 0
    for block in blocks:
        text = block.text.strip()
        if not text:
            continue
        if parts:
            pos += 2  # the "\n\n" between blocks
        if block.heading:
            headings.append([pos, block.heading, clean(text, keep_lines=False)])
        parts.append(text)
        pos += len(text)
    return Assembled("\n\n".join(parts), headings)

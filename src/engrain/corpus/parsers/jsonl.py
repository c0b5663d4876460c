"""JSON Lines and JSON exports: one document per record, its text in a configurable field."""

from __future__ import annotations

import json
import re

from .blocks import ParseError, Parsed, paragraphs
from .text import decode

_SAFE_KEY = re.compile(r"[^\w.-]+")


def _record(obj, where: str, text_field: str, index: int) -> Parsed | None:
    if not isinstance(obj, dict):
        raise ParseError(f"{where}: a {type(obj).__name__}, not an object with a {text_field!r} field")
    text = obj.get(text_field)
    if text is None:
        raise ParseError(f"{where}: no {text_field!r} field (fields: {', '.join(list(obj)[:8])}); "
                         f"set ingest.json_text_field in the workspace config")
    if not isinstance(text, str):
        raise ParseError(f"{where}: field {text_field!r} is a {type(text).__name__}, not a string")
    if not text.strip():
        return None
    raw_key = obj.get("id", obj.get("_id", index))
    key = _SAFE_KEY.sub("-", str(raw_key)).strip("-") or str(index)
    title = obj.get("title") if isinstance(obj.get("title"), str) else ""
    return Parsed(paragraphs(text), title=title, key=key, meta={"record": index})


def parse_json(data: bytes, jsonl: bool, text_field: str = "text") -> list[Parsed]:
    text, _, warnings = decode(data)
    records: list[tuple[str, object]] = []
    single = False  # a single JSON object is one document named after the file
    if jsonl:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"line {lineno}", json.loads(line)))
            except ValueError as exc:
                raise ParseError(f"line {lineno}: not valid JSON ({exc})") from exc
    else:
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise ParseError(f"not valid JSON ({exc})") from exc
        single = not isinstance(obj, list)
        items = [obj] if single else obj
        records = [(f"item {i}" if isinstance(obj, list) else "top level", o) for i, o in enumerate(items)]
    docs, seen = [], set()
    for index, (where, obj) in enumerate(records):
        parsed = _record(obj, where, text_field, index)
        if parsed is None:
            continue
        if parsed.key in seen:  # ids must be unique inside the file; fall back to the position
            parsed.key = f"{parsed.key}-{index}"
        seen.add(parsed.key)
        docs.append(parsed)
    if not docs:
        raise ParseError(f"no record with a non-empty {text_field!r} field")
    if single:
        docs[0].key = ""
    docs[0].warnings.extend(warnings)
    return docs

"""Reading JSON Lines files, one object a line: the one reader every stage uses, so a broken line is reported the
same way everywhere (the file, the line, what to do). Writing stays in ``engrain.atomic`` and the append logs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .errors import EngrainError

DEFAULT_HINT = "Each line must be one JSON object; fix or delete that line."


def read_jsonl(path: Path | str, *, hint: str = DEFAULT_HINT, skip_bad: bool = False,
               tolerate_torn_tail: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number from 1, object) for each non-blank line of ``path``.

    A line that is not a JSON object raises EngrainError naming ``path:line``, with ``hint`` saying what to do.
    ``skip_bad`` skips such lines instead (undecodable bytes become U+FFFD): for caches and journals, where a bad
    line is only work to do again. ``tolerate_torn_tail`` ignores a last line that lacks its newline: a write a
    kill cut short, which a valid-looking prefix must not pass for a record."""
    path = Path(path)
    with path.open("rb") as f:  # bytes: a line number for bad UTF-8 too, and only "\n" ends a line
        for lineno, raw in enumerate(f, 1):
            if tolerate_torn_tail and not raw.endswith(b"\n"):
                break
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8", errors="replace" if skip_bad else "strict"))
            except ValueError as exc:  # UnicodeDecodeError is one too
                if skip_bad:
                    continue
                raise EngrainError(f"{path}:{lineno}: not valid JSON ({exc}).", hint=hint) from exc
            if not isinstance(row, dict):
                if skip_bad:
                    continue
                raise EngrainError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}.", hint=hint)
            yield lineno, row

"""The one JSONL reader: blank lines skipped, a bad line named by file and line, or skipped where asked."""

from __future__ import annotations

import pytest

from engrain.errors import EngrainError
from engrain.jsonl import read_jsonl


def test_reads_objects_with_their_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"b": "é"}\r\n{"c": 3}', encoding="utf-8")
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (4, {"b": "é"}), (5, {"c": 3})]


@pytest.mark.parametrize("line, words", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                                         ("\xff", "not valid JSON")])
def test_a_bad_line_names_the_file_and_line(tmp_path, line, words):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\n' + line.encode("latin-1") + b"\n")
    with pytest.raises(EngrainError) as err:
        list(read_jsonl(path, hint="Fix it."))
    assert f"{path}:2: {words}" in err.value.message and err.value.hint == "Fix it."


def test_skip_bad_and_a_torn_tail(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\n{garbled\n"text"\n{"b": "\xff"}\n{"c": 3}')
    assert [row for _, row in read_jsonl(path, skip_bad=True)] == [{"a": 1}, {"b": "\ufffd"}, {"c": 3}]
    # the last line lacks its newline: a write a kill cut short, even where what is there parses
    assert [row for _, row in read_jsonl(path, skip_bad=True, tolerate_torn_tail=True)] == [{"a": 1}, {"b": "\ufffd"}]

"""`engrain paired`: methods of separate runs tested question by question against a reference, from their
results.json files alone (no model); bad run names are messages, not tracebacks."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from engrain.cli import app
from engrain.errors import EngrainError


def make_bench(root):
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "mill.md").write_text("The Corran mill stands at Oskarvik.")
    questions = [{"id": f"q{i}", "type": "qa", "question": f"Question {i}?", "answers": [f"answer{i}"],
                  "docs": ["mill"]} for i in range(12)]
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return root


def write_run(path, method: str, right: set[int]):
    answers = [{"id": f"q{i}", "answer": f"it is answer{i}" if i in right else "no idea"} for i in range(12)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"methods": {method: {}}, "answers": {method: answers}}))
    return f"{path}:{method}"


def test_paired_tests_each_run_against_the_reference(tmp_path):
    bench = make_bench(tmp_path / "bench")
    ref = write_run(tmp_path / "a" / "results.json", "base", {0})
    better = write_run(tmp_path / "b" / "results.json", "lora", set(range(10)))
    res = CliRunner().invoke(app, ["paired", str(bench), better, "--against", ref, "--json"])
    assert res.exit_code == 0, res.output
    table = json.loads(res.stdout.strip().splitlines()[-1])
    row = table["rows"][0]
    assert table["reference_contains"] == 1 / 12 and row["contains"] == 10 / 12
    assert (row["vs_reference"]["wins"], row["vs_reference"]["losses"]) == (9, 0)
    assert row["vs_reference"]["p_value"] < 0.01


def test_paired_names_a_bad_run(tmp_path):
    bench = make_bench(tmp_path / "bench")
    ref = write_run(tmp_path / "a" / "results.json", "base", {0})
    for spec, words in ((f"{tmp_path}/a/results.json:lora", "no answers for method 'lora'"),
                        (f"{tmp_path}/missing.json:base", "does not exist"),
                        ("no-method-here", "does not name a run")):
        res = CliRunner().invoke(app, ["paired", str(bench), spec, "--against", ref])
        # `engrain` (cli.main) prints an EngrainError as a message with exit status 2; the runner hands it back raw
        assert isinstance(res.exception, EngrainError), res.output
        assert words in str(res.exception)

"""`engrain paired`: methods of separate runs tested question by question against a reference, from their
results.json files alone (no model); bad run names are messages, not tracebacks."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from engrain.cli import app
from engrain.errors import EngrainError
from engrain.evaluate.paired import joined_answers


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


def test_paired_and_pooled_on_the_questions_of_some_hops(tmp_path):
    bench = make_bench(tmp_path / "bench")
    rows = [json.loads(line) for line in (bench / "questions.jsonl").read_text().splitlines()]
    for row in rows[8:]:  # q8 to q11 join two documents
        row["hops"] = 2
    (bench / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref = write_run(tmp_path / "a" / "results.json", "base", {0, 8})
    better = write_run(tmp_path / "b" / "results.json", "lora", {0, 1, 8, 9, 10})
    res = CliRunner().invoke(app, ["paired", str(bench), better, "--against", ref, "--hops", "2", "--json"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout.strip().splitlines()[-1])["rows"][0]
    assert row["contains"] == 3 / 4 and (row["vs_reference"]["wins"], row["vs_reference"]["losses"]) == (2, 0)
    res = CliRunner().invoke(app, ["pooled", str(bench), f"{better}={ref}", "--hops", "1", "--json"])
    assert res.exit_code == 0, res.output
    pooled = json.loads(res.stdout.strip().splitlines()[-1])
    assert pooled["n_questions"] == 8 and (pooled["pooled"]["wins"], pooled["pooled"]["losses"]) == (1, 0)
    res = CliRunner().invoke(app, ["paired", str(bench), better, "--against", ref, "--hops", "3"])
    assert isinstance(res.exception, EngrainError) and "no question of 3 hops" in str(res.exception)


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


def test_sign_flip_p_is_mcnemar_on_one_pair_and_keeps_a_question_together_across_pairs():
    from engrain.evaluate.metrics import mcnemar_p, sign_flip_p

    for wins, losses in ((12, 7), (17, 0), (6, 6), (0, 0)):
        assert sign_flip_p([1] * wins + [-1] * losses + [0] * 20) == mcnemar_p(wins, losses)
    # the same 6 questions won in both seeds: 6 flips of +-2, not 12 independent ones
    assert sign_flip_p([2] * 6) == 2 / 2**6 == mcnemar_p(6, 0)
    assert sign_flip_p([2] * 6) > mcnemar_p(12, 0)


def test_pooled_tests_each_pair_and_all_pairs_as_one(tmp_path):
    bench = make_bench(tmp_path / "bench")
    seed0 = write_run(tmp_path / "t0" / "results.json", "lora", set(range(9))) + "=" + \
        write_run(tmp_path / "c0" / "results.json", "lora", {0})
    seed1 = write_run(tmp_path / "t1" / "results.json", "lora", set(range(1, 9))) + "=" + \
        write_run(tmp_path / "c1" / "results.json", "lora", {9})
    res = CliRunner().invoke(app, ["pooled", str(bench), seed0, seed1, "--json"])
    assert res.exit_code == 0, res.output
    table = json.loads(res.stdout.strip().splitlines()[-1])
    assert [(p["vs_control"]["wins"], p["vs_control"]["losses"]) for p in table["pairs"]] == [(8, 0), (8, 1)]
    pooled = table["pooled"]
    assert (pooled["wins"], pooled["losses"]) == (16, 1)
    assert abs(pooled["diff"] - (8 / 12 + 7 / 12) / 2) < 1e-9
    # per question summed over seeds: q0 0, q1..q8 +2, q9 -1; of 2**9 sign patterns only q9's two signs with
    # every +2 kept on one side reach the observed |15|
    assert pooled["p_value"] == 4 / 2**9
    text = CliRunner().invoke(app, ["pooled", str(bench), seed0, seed1]).stdout
    assert "| pooled |" in text and "16 / 1" in text


def test_pooled_names_a_bad_pair(tmp_path):
    bench = make_bench(tmp_path / "bench")
    run = write_run(tmp_path / "a" / "results.json", "base", {0})
    for spec, words in ((run, "does not name a pair"), (f"{run}=no-method", "does not name a run")):
        res = CliRunner().invoke(app, ["pooled", str(bench), spec])
        assert isinstance(res.exception, EngrainError), res.output
        assert words in str(res.exception)


def write_general_run(path, method: str, right: set[int]):
    """A results.json whose trained memory's weights answered the general questions, right on ``right``."""
    from engrain.evaluate.forgetting import general_questions

    answers = {q.id: (q.answers[0] if i in right else "no idea") for i, q in enumerate(general_questions())}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"methods": {method: {"forgetting": {"general_answers": answers}}},
                                "answers": {method: []}}))
    return f"{path}:{method}"


def test_paired_and_pooled_test_forgetting_on_the_general_questions(tmp_path, monkeypatch):
    """`general` in place of a benchmark tests the trained weights' general answers question by question; a run
    without them (an untrained method, an older comparison) is a message."""
    monkeypatch.chdir(tmp_path)
    keeps = write_general_run(tmp_path / "a" / "results.json", "lora", set(range(100)))
    forgets = write_general_run(tmp_path / "b" / "results.json", "lora", set(range(80)))
    res = CliRunner().invoke(app, ["paired", "general", forgets, "--against", keeps, "--json"])
    assert res.exit_code == 0, res.output
    table = json.loads(res.stdout.strip().splitlines()[-1])
    assert table["n_questions"] == 120 and table["reference_contains"] == 100 / 120
    d = table["rows"][0]["vs_reference"]
    assert (d["wins"], d["losses"]) == (0, 20) and d["p_value"] < 1e-5
    res = CliRunner().invoke(app, ["pooled", "general", f"{forgets}={keeps}", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout.strip().splitlines()[-1])["pooled"]["losses"] == 20
    plain = write_run(tmp_path / "c" / "results.json", "lora", {0})
    res = CliRunner().invoke(app, ["paired", "general", plain, "--against", keeps])
    assert isinstance(res.exception, EngrainError) and "no general answers" in str(res.exception)


def test_compare_against_tests_forgetting_too_where_both_runs_recorded_it(tmp_path):
    """`engrain compare --against` adds the general-QA test of each trained method whose general answers this run
    and the reference both hold; a reference without them leaves the table as it was."""
    from engrain.evaluate.bench import Question
    from engrain.evaluate.paired import markdown, run_against

    def with_bench_answers(path):
        saved = json.loads(path.read_text())
        saved["answers"]["lora"] = [{"id": "q0", "answer": "answer0"}]
        path.write_text(json.dumps(saved))
        return saved

    reference = write_general_run(tmp_path / "ref" / "results.json", "lora", set(range(100)))
    with_bench_answers(tmp_path / "ref" / "results.json")
    write_general_run(tmp_path / "this" / "results.json", "lora", set(range(30, 100)))
    this = with_bench_answers(tmp_path / "this" / "results.json")
    this["methods"]["base"], this["answers"]["base"] = {}, [{"id": "q0", "answer": "no idea"}]
    questions = [Question(id="q0", type="qa", question="Question 0?", answers=["answer0"], docs=[], hops=1, tags=[])]
    table = run_against(this, questions, reference)
    general = table["general"]
    assert [r["run"] for r in general["rows"]] == ["lora"] and general["n_questions"] == 120
    assert (general["rows"][0]["vs_reference"]["wins"], general["rows"][0]["vs_reference"]["losses"]) == (0, 30)
    assert "General QA of the trained weights" in markdown(table)
    plain = write_run(tmp_path / "old" / "results.json", "lora", {0})
    assert "general" not in run_against(this, questions, plain)


def test_answers_of_disjoint_slices_join_for_the_methods_all_of_them_answered():
    def run(ids: list[str], methods: tuple[str, ...]) -> dict:
        return {"answers": {m: [{"id": i, "answer": f"{m} {i}"} for i in ids] for m in methods}}

    joined = joined_answers([("a", run(["q1", "q2"], ("rag", "lora"))), ("b", run(["q3"], ("lora", "rag", "base")))])
    assert list(joined) == ["rag", "lora"]  # base is missing from the first slice
    assert joined["lora"] == {"q1": "lora q1", "q2": "lora q2", "q3": "lora q3"}
    with pytest.raises(EngrainError, match="answers q2 again"):
        joined_answers([("a", run(["q1", "q2"], ("rag",))), ("b", run(["q2"], ("rag",)))])
    with pytest.raises(EngrainError, match="share no method"):
        joined_answers([("a", run(["q1"], ("rag",))), ("b", run(["q2"], ("lora",)))])

"""Methods from separate runs tested question by question against one reference (``engrain paired``, and
``engrain compare --against``).

A run is named ``FILE:METHOD``: a results.json and a method in it. Every run must have answered the same benchmark
questions (the same ``--docs``). Answers are rescored here from their text against the benchmark's gold answers, so
results.json files written before per-question scores were recorded work too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import EngrainError
from . import metrics
from .bench import Question


@dataclass
class Scored:
    label: str  # "<run folder>:<method>", or the method alone for the run in hand
    scores: list[float]  # contains, per question in the benchmark's order


def split_spec(spec: str) -> tuple[Path, str]:
    """``OUT/results.json:lora`` -> (path, method); EngrainError when either part is missing."""
    path, sep, method = spec.rpartition(":")
    if not sep or not path or not method:
        raise EngrainError(f"'{spec}' does not name a run.", hint="Write FILE:METHOD, e.g. OUT/results.json:rag.")
    return Path(path), method


def answers_of(results: dict, method: str, where: str) -> dict[str, str]:
    """question id -> answer text of one method in a results.json."""
    answers = (results.get("answers") or {}).get(method)
    if answers is None:
        have = ", ".join(results.get("answers") or {}) or "none"
        raise EngrainError(f"{where} has no answers for method '{method}'.", hint=f"Its methods: {have}.")
    return {a["id"]: a["answer"] for a in answers}


def score_answers(by_id: dict[str, str], questions: list[Question], label: str) -> Scored:
    missing = [q.id for q in questions if q.id not in by_id]
    if missing:
        raise EngrainError(f"{label} did not answer {len(missing)} of the {len(questions)} questions "
                           f"(e.g. {missing[0]}).", hint="Compare runs made with the same benchmark and --docs.")
    return Scored(label, [metrics.contains(by_id[q.id], q.answers) for q in questions])


def read_run(spec: str, questions: list[Question]) -> Scored:
    """``FILE:METHOD`` scored on ``questions``."""
    path, method = split_spec(spec)
    return score_answers(answers_of(load_results(path), method, str(path)), questions, f"{path.parent.name}:{method}")


def load_results(path: Path) -> dict:
    """A results.json, or an EngrainError saying what is wrong with it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EngrainError(f"{path} does not exist.", hint="Name a results.json written by `engrain compare`.") from None
    except json.JSONDecodeError as exc:
        raise EngrainError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}).",
                           hint="Name a results.json written by `engrain compare`.") from None


def paired_rows(reference: Scored, runs: list[Scored]) -> list[dict]:
    """Per run: contains with its 95% interval, and the paired difference to the reference (bootstrap interval,
    questions won and lost, McNemar's exact p)."""
    rows = []
    for run in runs:
        n = len(run.scores)
        rows.append({"run": run.label, "contains": sum(run.scores) / max(1, n),
                     "contains_ci": list(metrics.wilson_ci(sum(run.scores), n)),
                     "vs_reference": metrics.paired_difference(run.scores, reference.scores)})
    return rows


def against(reference_spec: str, runs: list[Scored], questions: list[Question]) -> dict:
    """The runs tested against ``FILE:METHOD``: what results.json records under ``against``."""
    reference = read_run(reference_spec, questions)
    return {"reference": reference_spec, "reference_label": reference.label,
            "reference_contains": sum(reference.scores) / max(1, len(reference.scores)),
            "n_questions": len(questions), "rows": paired_rows(reference, runs)}


def markdown(table: dict) -> str:
    """The table ``against`` returns, as markdown."""
    from .report import fmt_paired

    lines = [f"{table['n_questions']} questions; reference {table['reference_label']}: "
             f"{table['reference_contains']:.3f}", "",
             "| run | contains (95% CI) | difference [95% paired CI] p | won / lost |", "|---|---|---|---|"]
    for r in table["rows"]:
        d = r["vs_reference"]
        lo, hi = r["contains_ci"]
        lines.append(f"| {r['run']} | {r['contains']:.3f} ({lo:.3f}-{hi:.3f}) | {fmt_paired(d)} | "
                     f"{d['wins']} / {d['losses']} |")
    return "\n".join(lines)


def check_reference(spec: str) -> None:
    """Fail before any model loads when ``FILE:METHOD`` cannot be read."""
    path, method = split_spec(spec)
    answers_of(load_results(path), method, str(path))


def run_against(results: dict, questions: list[Question], reference_spec: str) -> dict:
    """Every method of a finished comparison (``results``) tested against ``FILE:METHOD`` on the questions it
    answered (all of ``questions``, or the first ``--limit`` of them)."""
    answered = {a["id"] for run in (results.get("answers") or {}).values() for a in run}
    asked = [q for q in questions if q.id in answered]
    runs = [score_answers(answers_of(results, m, "this run"), asked, m) for m in results["methods"]]
    return against(reference_spec, runs, asked)

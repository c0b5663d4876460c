"""Methods from separate runs tested question by question against one reference (``engrain paired``, and
``engrain compare --against``), and pairs of runs repeated with other seeds pooled into one test (``engrain pooled``).

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


GENERAL = "general"  # the BENCH that names the general questions forgetting is measured on


def is_general(bench: Path) -> bool:
    """Whether ``bench`` names the general questions (a folder called general in the working directory wins)."""
    return str(bench) == GENERAL and not bench.exists()


def general_answers_of(results: dict, method: str) -> dict[str, str] | None:
    """question id -> a trained method's closed-book answer to the general questions, as the comparison's forgetting
    measurement recorded it (None for an untrained method or a comparison made before they were recorded)."""
    return (((results.get("methods") or {}).get(method) or {}).get("forgetting") or {}).get("general_answers")


def answers_of(results: dict, method: str, where: str, general: bool = False) -> dict[str, str]:
    """question id -> answer text of one method in a results.json (``general``: ``general_answers_of``)."""
    if general:
        answers = general_answers_of(results, method)
        if answers is None:
            raise EngrainError(f"{where} has no general answers for method '{method}'.",
                               hint="Only trained memories have them, in comparisons run since engrain recorded "
                                    "them; run the comparison again.")
        return answers
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


def read_run(spec: str, questions: list[Question], general: bool = False) -> Scored:
    """``FILE:METHOD`` scored on ``questions`` (``general``: the general questions, see ``answers_of``)."""
    path, method = split_spec(spec)
    return score_answers(answers_of(load_results(path), method, str(path), general), questions,
                         f"{path.parent.name}:{method}")


def load_results(path: Path) -> dict:
    """A results.json, or an EngrainError saying what is wrong with it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EngrainError(f"{path} does not exist.", hint="Name a results.json written by `engrain compare`.") from None
    except json.JSONDecodeError as exc:
        raise EngrainError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}).",
                           hint="Name a results.json written by `engrain compare`.") from None


def joined_answers(runs: list[tuple[str, dict]]) -> dict[str, dict[str, str]]:
    """method -> question id -> answer over results.json files made on disjoint slices of one benchmark (``runs``:
    (where each was read, its content)), for the methods every file answered, in file order. An EngrainError where
    they share no method, or where two files answer one question (the slices overlap)."""
    contents = [run for _, run in runs]
    methods = [m for m in contents[0].get("answers") or {} if all(m in (r.get("answers") or {}) for r in contents)]
    if not methods:
        raise EngrainError(f"{', '.join(where for where, _ in runs)} share no method's answers.",
                           hint="Join runs of the same methods, one per slice.")
    joined: dict[str, dict[str, str]] = {m: {} for m in methods}
    for where, run in runs:
        for method in methods:
            for qid, text in answers_of(run, method, where).items():
                if qid in joined[method]:
                    raise EngrainError(f"{where} answers {qid} again.", hint="The slices must not overlap.")
                joined[method][qid] = text
    return joined


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


def against(reference_spec: str, runs: list[Scored], questions: list[Question], general: bool = False) -> dict:
    """The runs tested against ``FILE:METHOD``: what results.json records under ``against``."""
    reference = read_run(reference_spec, questions, general)
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
    if "general" in table:
        lines += ["", "General QA of the trained weights (forgetting), the same test:", "", markdown(table["general"])]
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
    table = against(reference_spec, runs, asked)
    # Where the reference and methods of this run are trained memories whose general answers were recorded, their
    # forgetting is tested the same way (`engrain paired general`).
    trained = [m for m in results["methods"] if general_answers_of(results, m)]
    path, method = split_spec(reference_spec)
    if trained and general_answers_of(load_results(path), method):
        from .forgetting import general_questions

        general = general_questions()
        table["general"] = against(reference_spec, [score_answers(general_answers_of(results, m), general, m)
                                                    for m in trained], general, True)
    return table


def bench_questions(bench: Path, docs: int | None = None, hops: int | None = None) -> list[Question]:
    """The questions of the benchmark folder ``bench``, cut to its first ``docs`` documents' as the runs were, and
    to those joining ``hops`` documents when given; ``general`` (``GENERAL``) names the general questions forgetting
    is measured on."""
    from .bench import load_bench

    if is_general(bench):
        from .forgetting import general_questions

        questions = general_questions()
    else:
        loaded = load_bench(bench)
        questions = (loaded.first_docs(docs) if docs else loaded).questions
    if hops is None:
        return questions
    kept = [q for q in questions if q.hops == hops]
    if not kept:
        raise EngrainError(f"{bench} has no question of {hops} hops.",
                           hint="Leave out --hops, or pick a count its questions.jsonl's `hops` fields hold.")
    return kept


def split_pair(spec: str) -> tuple[str, str]:
    """``A/results.json:lora=B/results.json:lora`` -> (treated, control)."""
    treated, sep, control = spec.partition("=")
    if not sep or not treated or not control:
        raise EngrainError(f"'{spec}' does not name a pair of runs.",
                           hint="Write TREATED=CONTROL, each FILE:METHOD, e.g. new/results.json:lora=old/results.json:lora.")
    return treated, control


def pooled(pairs: list[str], questions: list[Question], general: bool = False) -> dict:
    """Pairs of runs (``TREATED=CONTROL``), each a treatment and its control trained with the same seed, tested as
    one: each pair's paired difference, then over all pairs the mean difference, its 95% bootstrap interval with a
    question's runs resampled together, the questions won and lost summed, and an exact sign-flip p on each
    question's summed difference (``metrics.sign_flip_p``; a question answered differently in two seeds counts
    once, not twice, as summing McNemar's counts would)."""
    if not pairs:
        raise EngrainError("No pairs of runs given.", hint="Name at least one TREATED=CONTROL pair.")
    rows, sums = [], [0] * len(questions)
    for spec in pairs:
        treated, control = (read_run(s, questions, general) for s in split_pair(spec))
        rows.append({"treated": treated.label, "control": control.label,
                     "treated_contains": sum(treated.scores) / max(1, len(questions)),
                     "control_contains": sum(control.scores) / max(1, len(questions)),
                     "vs_control": metrics.paired_difference(treated.scores, control.scores)})
        sums = [t + round(a - b) for t, a, b in zip(sums, treated.scores, control.scores)]
    per_question = [t / len(pairs) for t in sums]
    return {"n_questions": len(questions), "pairs": rows,
            "pooled": {"diff": sum(per_question) / max(1, len(per_question)),
                       "diff_ci": list(metrics.bootstrap_ci(per_question)),
                       "wins": sum(r["vs_control"]["wins"] for r in rows),
                       "losses": sum(r["vs_control"]["losses"] for r in rows),
                       "p_value": metrics.sign_flip_p(sums), "n": len(questions)}}


def pooled_markdown(table: dict) -> str:
    """The table ``pooled`` returns, as markdown."""
    from .report import fmt_paired

    lines = [f"{table['n_questions']} questions, {len(table['pairs'])} pairs", "",
             "| treated | control | contains, treated / control | difference [95% paired CI] p | won / lost |",
             "|---|---|---|---|---|"]
    for r in table["pairs"]:
        d = r["vs_control"]
        lines.append(f"| {r['treated']} | {r['control']} | {r['treated_contains']:.3f} / {r['control_contains']:.3f} "
                     f"| {fmt_paired(d)} | {d['wins']} / {d['losses']} |")
    d = table["pooled"]
    lines.append(f"| pooled | | | {fmt_paired(d)} | {d['wins']} / {d['losses']} |")
    return "\n".join(lines)

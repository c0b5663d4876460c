"""``engrain compare --arrivals N``: the benchmark's documents arrive in N batches, and a trained memory keeps up.

Batch 1 is ingested and the memory trained on it; each later batch is ingested beside the earlier ones and taught
with ``engrain update`` (synthesis of the new chunks only, training from the saved weights with rehearsal of earlier
items and the general replay). After every step the memory answers the questions of each batch seen so far
(retention of the earlier batches, accuracy on the newest) and the general questions (forgetting), and the step's
cost is recorded. At the end one memory is trained from nothing on all documents with the same recipe: the rebuild
the updated memory is held to, in accuracy (paired, question by question) and in cost.

Before each arrival after the first, one earlier document is edited (two of its facts swapped, ``edits.py``): the
memory must then answer them with their new values, which the scenario measures as changed facts.

The scenario writes its progress to ``WS/arrivals/<bench>.json`` after every step (atomically), so a rerun after a
crash keeps the finished steps and resumes the interrupted training or update from its checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console

from ..atomic import write_json
from ..config import load_config
from ..errors import EngrainError
from ..models import LM
from ..workspace import Workspace
from . import forgetting, metrics
from .bench import Bench, Question, doc_id
from .compare import MethodRun, ask, contains_scores
from .edits import Edit, plan_edits, questions_at, touched, write_docs

console = Console(stderr=True)
UPDATED, REBUILT = "{}-arrivals", "{}-rebuild"  # the memories the scenario trains, apart from the workspace's own


def split_batches(files: list[str], n: int) -> list[list[str]]:
    """``files`` (in path order) cut into ``n`` consecutive batches whose sizes differ by at most one."""
    if n < 2 or n > len(files):
        raise EngrainError(f"--arrivals is {n} for {len(files)} documents.",
                           hint="Give between 2 and the number of documents (with --docs, of the documents kept).")
    size, extra = divmod(len(files), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(files[start:end])
        start = end
    return out


def question_batches(questions: list[Question], batches: list[list[str]]) -> list[int]:
    """The batch (1-based) each question belongs to: the latest batch among its documents, the first one after
    which it can be answered."""
    batch_of = {doc_id(f): i for i, part in enumerate(batches, 1) for f in part}
    return [max(batch_of[d] for d in q.docs) for q in questions]


def check_method(methods: list[str]) -> str:
    """The one memory kind the scenario updates; an error saying what to pass otherwise."""
    from ..train.update import UPDATABLE

    trained = [m for m in methods if m != "base"]
    if len(trained) != 1 or trained[0] not in UPDATABLE:
        raise EngrainError(f"--arrivals follows one memory that engrain update can teach; --methods is "
                           f"{','.join(methods)}.", hint=f"Use --methods {UPDATABLE[0]} (or one of "
                                                         f"{', '.join(UPDATABLE)}; base may be added).")
    return trained[0]


def run_arrivals(bench: Bench, workspace: Workspace, kind: str, lm: LM, n: int, *, seed: int = 0,
                 probe_form: str = "continuation", max_new_tokens: int = 48,
                 rebuild: bool = False) -> tuple[dict, MethodRun, list[Question]]:
    """Run the scenario (resuming a recorded one); returns results.json's ``arrivals`` section, the updated
    memory's answers to every question (a MethodRun for the usual tables) and the questions as the edited documents
    answer them (what every method is scored against)."""
    batches = split_batches(bench.files(), n)
    of_batch = question_batches(bench.questions, batches)
    edits = plan_edits(bench, batches)
    state_path = workspace.root / "arrivals" / f"{bench.name}.json"
    state = start_state(state_path, workspace, kind, batches, edits, rebuild)
    docs = workspace.root / "arrivals" / f"{bench.name}-docs"
    base_cache: dict = {}
    from ..memory.registry import open_memory

    base_memory = open_memory("base", workspace, lm)
    for k in range(len(state["steps"]) + 1, n + 1):
        console.rule(f"[bold]arrival {k} of {n}: {len(batches[k - 1])} documents")
        seen = [f for part in batches[:k] for f in part]
        write_docs(bench, docs, seen, edits, k)
        cost = learn(workspace, bench, docs, lm, kind, seen, first=k == 1)
        step = measure_step(workspace, UPDATED.format(kind), lm, bench.questions, of_batch, edits, k, base_memory,
                            base_cache, probe_form, max_new_tokens)
        state["steps"].append({"arrival": k, "documents": batches[k - 1], **cost, **step})
        write_json(state_path, state)
    final = questions_at(bench.questions, edits, n)
    if "rebuild" not in state:
        console.rule("[bold]rebuild: one memory trained from nothing on every document")
        state["rebuild"] = rebuild_reference(workspace, final, lm, kind, base_memory, base_cache, probe_form,
                                             max_new_tokens)
        write_json(state_path, state)
    section, run = summarise(state, workspace, final, lm, kind, of_batch, probe_form, max_new_tokens)
    return section, run, final


def start_state(path: Path, workspace: Workspace, kind: str, batches: list[list[str]], edits: list[Edit],
                rebuild: bool) -> dict:
    """The recorded scenario when it is the same plan; else a fresh one, with the memories of an earlier one
    removed (they hold documents of later batches, so they cannot stand for an earlier step)."""
    from ..train.checkpoints import run_dir

    plan = {"memory": kind, "batches": batches, "edits": [e.to_dict() for e in edits]}
    if path.is_file() and not rebuild:
        state = json.loads(path.read_text())
        if state.get("plan") == plan:
            if state["steps"]:
                console.print(f"resuming the scenario recorded in {path}: {len(state['steps'])} step(s) done")
            return state
        raise EngrainError(f"{path} records a scenario with other batches or another memory.",
                           hint="Pass --rebuild to start this one over (its memories are trained again).")
    for name in (UPDATED.format(kind), REBUILT.format(kind)):
        shutil.rmtree(workspace.memory_dir(name), ignore_errors=True)
        shutil.rmtree(run_dir(workspace, name), ignore_errors=True)
    shutil.rmtree(path.parent / f"{path.stem}-docs", ignore_errors=True)  # an earlier scenario's edited documents
    state = {"plan": plan, "steps": []}
    write_json(path, state)
    return state


def learn(workspace: Workspace, bench: Bench, docs: Path, lm: LM, kind: str, seen: list[str], first: bool) -> dict:
    """Bring the corpus to ``seen`` (read from ``docs``, the scenario's copies) and teach the memory: trained on
    batch 1, updated on every later batch.
    Returns the step's cost: seconds (ingest, synthesis and training) and training tokens."""
    from ..pipeline import ensure_corpus, ensure_synth

    config = load_config(workspace.config_path)
    t0 = time.perf_counter()
    ensure_corpus(workspace, docs, lm, seen)
    # The leak guard: benchmark questions reach synthesis only as its exclusion list.
    ensure_synth(workspace, lm, [bench.root / "questions.jsonl"])
    name = UPDATED.format(kind)
    if first:
        from ..train.loop import train

        meta = train(workspace, config.train.model_copy(update={"memory": kind, "name": name}), lm.path)
        own = {"train_seconds": meta.get("train_seconds"), "steps": meta.get("steps")}
        earlier = earlier_training_seconds(meta.get("train_seconds"), meta.get("resumed_seconds"),
                                           finished=bool(meta.get("already_trained")))
    else:
        from ..memory.parametric import read_meta
        from ..train.update import update

        meta = update(workspace, config, lm.path, name=name, exclude_questions=[bench.root / "questions.jsonl"])
        finished = bool(meta.get("nothing_to_do"))  # the update finished before a crash kept the step unrecorded
        if finished:
            meta = read_meta(workspace.memory_dir(name))
        record = meta.get("update") or {}
        own = {"train_seconds": record.get("seconds"), "steps": record.get("steps")}
        earlier = earlier_training_seconds(record.get("seconds"), record.get("resumed_seconds"), finished=finished)
    # A run's train_tokens are the tokens that run trained (an update's own, not the memory's total).
    return {"seconds": round(time.perf_counter() - t0 + earlier, 2), **own, "train_tokens": meta.get("train_tokens")}


def earlier_training_seconds(total: float | None, resumed: float | None, *, finished: bool) -> float:
    """Training seconds of a run that another process did (before a crash): all of them (``total``) when this call
    found the run finished, those before the checkpoint it resumed from (``resumed``) otherwise. A step's cost adds
    them to its wall time, so a scenario resumed across sessions records what each step cost, not its last stretch."""
    return float((total if finished else resumed) or 0.0)


def measure_step(workspace: Workspace, name: str, lm: LM, questions: list[Question], of_batch: list[int],
                 edits: list[Edit], k: int, base_memory, base_cache: dict, probe_form: str, max_new_tokens: int) -> dict:
    """The memory after arrival ``k``: accuracy on each batch seen so far (questions an edit touched left out),
    the facts changed so far (new value given, old value still given), and forgetting."""
    from ..memory.parametric import TrainedMemory

    memory = TrainedMemory(name, workspace, lm)
    now = questions_at(questions, edits, k)
    asked = [(q, b) for q, b in zip(now, of_batch) if b <= k]
    answers = ask(memory, [q for q, _ in asked], probe_form=probe_form, max_new_tokens=max_new_tokens)
    scores = contains_scores([q for q, _ in asked], answers)
    skip = touched(questions, edits)
    by_batch = {}
    for b in range(1, k + 1):
        own = [s for s, (q, qb) in zip(scores, asked) if qb == b and q.id not in skip]
        by_batch[str(b)] = {"contains": sum(own) / max(1, len(own)), "n": len(own),
                            "contains_ci": list(metrics.wilson_ci(sum(own), len(own)))}
    said = {q.id: a.text for (q, _), a in zip(asked, answers)}
    changed = [(said[qid], old) for e in edits if e.arrival <= k for qid, (old, _) in e.questions.items()]
    new_scores = [s for (q, _), s in zip(asked, scores) if any(q.id in e.questions for e in edits if e.arrival <= k)]
    forgot = forgetting.of_trained(memory, base_memory, base_cache)
    console.print(f"after arrival {k}: " + ", ".join(f"batch {b} {v['contains']:.3f}" for b, v in by_batch.items())
                  + (f"; changed facts {sum(new_scores)}/{len(new_scores)} new" if new_scores else "")
                  + f"; general QA {100 * forgot['general_qa_delta']:+.1f} points"
                  + (f" ({100 * forgot['gated_general_qa_delta']:+.1f} gated)" if "gated_general_qa_delta" in forgot
                     else ""))
    return {"by_batch": by_batch, "seen": {"contains": sum(scores) / max(1, len(scores)), "n": len(scores)},
            "changed_facts": {"n": len(new_scores), "new_value": sum(new_scores) / len(new_scores) if new_scores else None,
                              "old_value": (sum(metrics.contains(text, old) for text, old in changed) / len(changed)
                                            if changed else None)},
            "scores": scores, "forgetting": forgot}


def rebuild_reference(workspace: Workspace, questions: list[Question], lm: LM, kind: str, base_memory,
                      base_cache: dict, probe_form: str, max_new_tokens: int) -> dict:
    """One memory of the same recipe trained from nothing on every document (as edited), answering every question."""
    from ..memory.parametric import TrainedMemory
    from ..train.loop import train

    config = load_config(workspace.config_path)
    t0 = time.perf_counter()
    meta = train(workspace, config.train.model_copy(update={"memory": kind, "name": REBUILT.format(kind)}), lm.path)
    earlier = earlier_training_seconds(meta.get("train_seconds"), meta.get("resumed_seconds"),
                                       finished=bool(meta.get("already_trained")))
    seconds = round(time.perf_counter() - t0 + earlier, 2)
    memory = TrainedMemory(REBUILT.format(kind), workspace, lm)
    answers = ask(memory, questions, probe_form=probe_form, max_new_tokens=max_new_tokens)
    forgot = forgetting.of_trained(memory, base_memory, base_cache)
    return {"seconds": seconds, "train_seconds": meta.get("train_seconds"), "train_tokens": meta.get("train_tokens"),
            "steps": meta.get("steps"), "scores": contains_scores(questions, answers),
            "answers": [a.text for a in answers], "forgetting": forgot}


def summarise(state: dict, workspace: Workspace, questions: list[Question], lm: LM, kind: str, of_batch: list[int],
              probe_form: str, max_new_tokens: int) -> tuple[dict, MethodRun]:
    """results.json's ``arrivals`` (the steps, the rebuild, the measures the scenario is held to) and the updated
    memory's run on every question, for the usual tables."""
    from ..memory.parametric import TrainedMemory
    from .compare import run_method

    steps, ref = state["steps"], state["rebuild"]
    final = run_method(kind, TrainedMemory(UPDATED.format(kind), workspace, lm), questions, latency_sample=0,
                       max_new_tokens=max_new_tokens, progress=True, probe_form=probe_form)
    final.describe["scenario"] = f"updated over {len(steps)} arrivals"
    first_batch = [s["by_batch"]["1"]["contains"] for s in steps]
    updates = [s for s in steps if s["arrival"] > 1]
    final_scores = contains_scores(questions, final.answers)
    rebuilt = sum(ref["scores"]) / max(1, len(ref["scores"]))
    updated = sum(final_scores) / max(1, len(final_scores))
    measures = {
        "batch1_retention": first_batch[-1] / first_batch[0] if first_batch[0] else None,
        "all_vs_rebuild": updated / rebuilt if rebuilt else None,
        "update_cost_vs_first_training": (sum(s["seconds"] for s in updates) / len(updates) / steps[0]["seconds"]
                                          if updates and steps[0]["seconds"] else None),
        "updates_vs_rebuild_seconds": sum(s["seconds"] for s in updates) / ref["seconds"] if ref["seconds"] else None,
        "changed_facts_new_value": steps[-1]["changed_facts"]["new_value"],
        "changed_facts_old_value": steps[-1]["changed_facts"]["old_value"],
        "general_qa_delta_after_all": steps[-1]["forgetting"]["general_qa_delta"],
        "gated_general_qa_delta_after_all": steps[-1]["forgetting"].get("gated_general_qa_delta"),
    }
    section = {"memory": kind, "batches": state["plan"]["batches"], "edits": state["plan"]["edits"],
               "question_batches": of_batch,
               "steps": [{k: v for k, v in s.items() if k != "scores"} for s in steps],
               "rebuild": {**{k: v for k, v in ref.items() if k not in ("scores", "answers")}, "contains": rebuilt,
                           "contains_ci": list(metrics.wilson_ci(sum(ref["scores"]), len(ref["scores"])))},
               "updated_vs_rebuild": metrics.paired_difference(final_scores, ref["scores"]),
               "measures": measures}
    final.forgetting = {**steps[-1]["forgetting"], "measured_on": "the updated weights, closed-book"}
    final.build_seconds = sum(s["seconds"] for s in steps)
    return section, final

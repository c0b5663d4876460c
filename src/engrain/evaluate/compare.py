"""Run every method on a benchmark's questions and measure them side by side (results.json contract).

For each method: answers for all questions (batched, greedy; cloze probes asked as ``probe_form`` says),
contains / EM / F1 with 95% intervals, breakdowns by tag and by hops, latency per question at batch 1 on a sample
(p50 / p95), prompt tokens, peak memory while it answered, build time and disk size of what it built, and
forgetting for trained memories. Questions never reach anything that builds a memory: they are read here, after building.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from .. import __version__
from ..errors import EngrainError
from ..memory.base import Answer, Memory
from ..models import cpu_model
from . import metrics
from .bench import Bench, Question

CLOZE_INSTRUCTION = "Complete the sentence with the missing words: "
# How cloze probes are asked: "continuation" hands the sentence start to Memory.complete as plain text (what the
# data sets intend); "chat" wraps it in an instruction (cloze_text) and asks it through Memory.answer.
PROBE_FORMS = ("continuation", "chat")


def check_probe_form(probe_form: str) -> str:
    """``probe_form`` when it is one of PROBE_FORMS; an EngrainError naming the choices otherwise."""
    if probe_form not in PROBE_FORMS:
        raise EngrainError(f"Unknown probe form '{probe_form}'.",
                           hint="Use --probe-form continuation (the sentence start as plain text, as the data sets "
                                "intend) or --probe-form chat (an instruction in the chat template).")
    return probe_form


def question_text(q: Question) -> str:
    """What a method is asked in the chat form. Cloze probes are the start of a sentence; an instruct model is asked
    to complete it (the gold continuation must then occur in its output, which may repeat the start)."""
    return cloze_text(q.question) if q.type == "cloze" else q.question


def cloze_text(start: str) -> str:
    """A cloze probe as the methods are asked it: the instruction and the sentence start, quoted, open-ended."""
    return f"{CLOZE_INSTRUCTION}\"{start.strip()} ...\""


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak_mb`` is the maximum seen while active."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def current_bytes() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self.current_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.peak = max(self.peak, self.current_bytes())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


@dataclass
class MethodRun:
    """Everything measured for one method."""

    name: str
    answers: list[Answer]
    latencies_ms: list[float]
    peak_rss_mb: float
    build_seconds: float = 0.0
    disk_bytes: int = 0
    describe: dict = field(default_factory=dict)
    forgetting: dict | None = None


def score(questions: list[Question], answers: list[Answer]) -> dict:
    """Accuracy with intervals and breakdowns by tag and by hops."""
    rows = [(q, metrics.contains(a.text, q.answers), metrics.exact_match(a.text, q.answers), metrics.f1(a.text, q.answers))
            for q, a in zip(questions, answers)]
    n = len(rows)
    c = [r[1] for r in rows]
    e = [r[2] for r in rows]
    f = [r[3] for r in rows]
    out = {
        "n": n,
        "contains": sum(c) / n, "em": sum(e) / n, "f1": sum(f) / n,
        "contains_ci": list(metrics.wilson_ci(sum(c), n)),
        "em_ci": list(metrics.wilson_ci(sum(e), n)),
        "f1_ci": list(metrics.bootstrap_ci(f)),
    }
    for key, groups in (("by_tag", lambda q: q.tags or ["untagged"]), ("by_hops", lambda q: [str(q.hops)])):
        buckets: dict[str, list[tuple]] = defaultdict(list)
        for r in rows:
            for g in groups(r[0]):
                buckets[g].append(r)
        out[key] = {g: {"contains": sum(x[1] for x in rs) / len(rs), "f1": sum(x[3] for x in rs) / len(rs),
                        "contains_ci": list(metrics.wilson_ci(sum(x[1] for x in rs), len(rs))), "n": len(rs)}
                    for g, rs in sorted(buckets.items())}
    return out


ANSWER_SLICE = 32  # questions handed to a memory per call: large enough to batch, small enough for progress


def ask(memory: Memory, questions: list[Question], *, probe_form: str = "continuation",
        max_new_tokens: int = 48) -> list[Answer]:
    """Every question's answer, in question order: cloze probes through ``memory.complete`` (the sentence start)
    when ``probe_form`` is "continuation", everything else through ``memory.answer`` (``question_text``)."""
    check_probe_form(probe_form)
    raw = [q.type == "cloze" and probe_form == "continuation" for q in questions]
    starts = [q.question for q, r in zip(questions, raw) if r]
    asked = [question_text(q) for q, r in zip(questions, raw) if not r]
    completed = iter(memory.complete(starts, max_new_tokens=max_new_tokens) if starts else [])
    answered = iter(memory.answer(asked, max_new_tokens=max_new_tokens) if asked else [])
    return [next(completed) if r else next(answered) for r in raw]


def run_method(name: str, memory: Memory, questions: list[Question], *, latency_sample: int = 10,
               max_new_tokens: int = 48, progress: bool = False, probe_form: str = "continuation") -> MethodRun:
    """Answer every question batched (accuracy), then time a sample one at a time (latency as a user sees it).
    Cloze probes are asked as ``probe_form`` says (see ``ask``); qa questions always through ``memory.answer``."""
    from ..progress import Progress

    check_probe_form(probe_form)
    sample = questions[:latency_sample]
    with PeakRSS() as rss:
        answers: list[Answer] = []
        with Progress(progress, len(questions), 0, f"{name}: answering") as bar:
            for start in range(0, len(questions), ANSWER_SLICE):
                answers += ask(memory, questions[start:start + ANSWER_SLICE], probe_form=probe_form,
                               max_new_tokens=max_new_tokens)
                bar.update(len(answers))
        latencies = []
        with Progress(progress, len(sample), 0, f"{name}: timing one at a time") as bar:
            for q in sample:
                t0 = time.perf_counter()
                ask(memory, [q], probe_form=probe_form, max_new_tokens=max_new_tokens)
                latencies.append((time.perf_counter() - t0) * 1000)
                bar.update(len(latencies))
    return MethodRun(name=name, answers=answers, latencies_ms=latencies, peak_rss_mb=rss.peak_mb,
                     describe=memory.describe())


def method_result(run: MethodRun, questions: list[Question]) -> dict:
    result = score(questions, run.answers)
    result.update({
        "latency_ms_p50": metrics.percentile(run.latencies_ms, 50),
        "latency_ms_p95": metrics.percentile(run.latencies_ms, 95),
        "latency_ms_batched_mean": sum(a.latency_ms for a in run.answers) / max(1, len(run.answers)),
        "latency_sample": len(run.latencies_ms),
        "prompt_tokens_mean": sum(a.prompt_tokens for a in run.answers) / max(1, len(run.answers)),
        "completion_tokens_mean": sum(a.completion_tokens for a in run.answers) / max(1, len(run.answers)),
        "build_seconds": run.build_seconds,
        "disk_bytes": run.disk_bytes,
        "peak_rss_mb": round(run.peak_rss_mb, 1),
        "forgetting": run.forgetting,
        "truncated_answers": sum(1 for a in run.answers if a.meta.get("truncated")),
        "gate_to_base": sum(1 for a in run.answers if a.meta.get("weights") == "base"),
        "describe": run.describe,
    })
    return result


def environment(seed: int, settings: dict) -> dict:
    import importlib.metadata as md

    versions = {}
    for dist in ("torch", "transformers", "peft", "lancedb", "sentence-transformers"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    return {"engrain": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "device": _device_name(), "cpu": cpu_model(), "versions": versions, "seed": seed,
            "settings": settings}


def _device_name() -> str:
    """What the numbers were measured on: the GPU's name, or the CPU and its thread count."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def contains_scores(questions: list[Question], answers: list[Answer]) -> list[float]:
    """1.0 per question whose answer contains a gold answer, else 0.0 (the per-question data paired tests use)."""
    return [metrics.contains(a.text, q.answers) for q, a in zip(questions, answers)]


def against_base(scores: dict[str, list[float]]) -> dict[str, dict]:
    """Each method against ``base`` on the same questions (paired difference in contains, McNemar's p), when base
    ran: whether a memory learned anything is this test, not two intervals that may overlap."""
    if "base" not in scores:
        return {}
    return {name: metrics.paired_difference(own, scores["base"]) for name, own in scores.items() if name != "base"}


def results_json(bench: Bench, model_name: str, runs: list[MethodRun], seed: int, settings: dict,
                 warnings: list[str] | None = None, probe_form: str = "continuation") -> dict:
    questions = bench.questions
    methods = {run.name: method_result(run, questions) for run in runs}
    scores = {run.name: contains_scores(questions, run.answers) for run in runs}
    for name, paired in against_base(scores).items():
        methods[name]["vs_base"] = paired
    return {
        "bench": bench.name,
        "n_questions": len(questions),
        "model": model_name,
        "probe_form": probe_form,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "methods": methods,
        "examples": [
            {"id": q.id, "question": q.question, "answers": q.answers, "hops": q.hops,
             **{run.name: run.answers[i].text for run in runs}}
            for i, q in enumerate(questions[:8])
        ],
        "answers": {run.name: [{"id": q.id, "answer": a.text, "contains": c, "chunks": a.chunks}
                               for q, a, c in zip(questions, run.answers, scores[run.name])] for run in runs},
        "warnings": warnings or [],
        "environment": environment(seed, settings),
    }

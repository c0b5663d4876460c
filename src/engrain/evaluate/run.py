"""`engrain compare`: build what each method needs (or reuse it), answer, score, write results and report."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from ..atomic import write_json
from ..config import load_config
from ..errors import EngrainError
from ..memory.base import ClosedBook
from ..memory.kinds import TRAINED, canonical, is_trained
from ..memory.registry import open_memory
from ..models import LM, decode_weights
from ..workspace import Workspace
from . import forgetting
from .bench import load_bench
from .compare import MethodRun, check_probe_form, results_json, run_method, score
from .report import write_report

console = Console(stderr=True)


def parse_methods(text: str) -> list[str]:
    methods = [canonical(m) for m in text.split(",") if m.strip()]  # old names still work, with a notice
    if not methods:
        raise EngrainError("--methods is empty.", hint="Example: --methods base,context,rag,lora")
    if len(set(methods)) != len(methods):
        raise EngrainError(f"--methods names a method twice: {text}.")
    return methods


def run_compare(bench_dir: Path, workspace: Workspace, methods: list[str], out_dir: Path, lm: LM, *,
                limit: int | None = None, latency_sample: int = 10, seed: int = 0, rebuild: bool = False,
                measure_forgetting: bool = True, max_new_tokens: int = 48, scaling: bool = False,
                docs: int | None = None, probe_form: str = "continuation", arrivals: int | None = None) -> dict:
    """Run the comparison and write results.json + report; returns the results dict. ``probe_form`` says how
    cloze probes are asked: "continuation" (the sentence start as plain text) or "chat" (an instruction).
    ``arrivals`` runs the sequential scenario instead of one build (``arrivals.py``) for the trained method."""
    import torch

    check_probe_form(probe_form)  # before anything is built
    torch.manual_seed(seed)
    bench = select_bench(bench_dir, docs, limit)
    warnings: list[str] = []
    runs: list[MethodRun] = []
    base_cache: dict = {}
    stage_times: dict[str, float] = {}  # stages already brought up to date in this comparison
    base_memory = open_memory("base", workspace, lm)
    weights_forgot: dict[str, dict] = {}  # trained memory kind -> its forgetting
    from ..pipeline import prepare  # builds corpus / index / synthetic data / trained memories as needed

    scenario = None
    if arrivals is not None:
        from .arrivals import check_method, run_arrivals

        # Every method is scored against the documents as the scenario left them (its edits changed two answers each).
        scenario, final, bench.questions = run_arrivals(bench, workspace, check_method(methods), lm, arrivals,
                                                        seed=seed, probe_form=probe_form,
                                                        max_new_tokens=max_new_tokens, rebuild=rebuild)
    for name in methods:
        if scenario is not None and name == final.name:
            runs.append(final)
            continue
        console.rule(f"[bold]{name}")
        build = prepare(name, workspace, bench, lm, rebuild=rebuild, seed=seed, stage_times=stage_times)
        memory = open_memory(name, workspace, lm)
        run = run_method(name, memory, bench.questions, latency_sample=latency_sample, max_new_tokens=max_new_tokens,
                         progress=True, probe_form=probe_form)
        run.build_seconds, run.disk_bytes = build.seconds, build.disk_bytes
        warnings += [f"{name}: {w}" for w in build.details.get("warnings", [])]
        truncated = sum(1 for a in run.answers if a.meta.get("truncated"))
        if truncated:
            warnings.append(f"{name}: the corpus did not fit the window for {truncated} questions and was truncated")
        base_kind = name.split("+")[0]
        if measure_forgetting and base_kind in TRAINED and hasattr(memory, "lm"):
            # What the weights forgot, asked closed-book: a hybrid would otherwise answer general questions with the
            # user's chunks in its prompt and count retrieval's distraction as forgetting. X and X+rag share weights.
            if base_kind not in weights_forgot:
                t0 = time.perf_counter()
                weights_forgot[base_kind] = {**forgetting.measure(ClosedBook(memory.lm), base_memory, base_cache),
                                             "measured_on": "the trained weights, closed-book"}
                console.print(f"forgetting measured in {time.perf_counter() - t0:.0f} s")
            run.forgetting = weights_forgot[base_kind]
            if getattr(memory, "gate", None) is not None:  # what a user asking general questions gets: gate and all
                run.forgetting = {**run.forgetting, **forgetting.gated(memory, base_cache)}
        runs.append(run)
        console.print(f"{name}: contains {score(bench.questions, run.answers)['contains']:.3f}")
    leak = None
    if any(is_trained(m) for m in methods):
        from .leakcheck import leak_check

        leak = leak_check(workspace, bench.root / "questions.jsonl")
        console.print(f"leak check: {leak['items_checked']} synthetic items, no benchmark text")
    settings = {"methods": methods, "docs": docs, "doc_files": bench.doc_files, "limit": limit,
                "latency_sample": latency_sample, "max_new_tokens": max_new_tokens, "probe_form": probe_form,
                "arrivals": arrivals, "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
                "decode_weights": getattr(lm.model, decode_weights.ATTRIBUTE, "model"),
                "workspace": str(workspace.root), "bench_dir": str(bench_dir),
                "config": load_config(workspace.config_path).model_dump()}  # what every stage was built with
    results = results_json(bench, lm.name, runs, seed, settings, warnings, probe_form=probe_form)
    results["leak_check"] = leak
    if scenario is not None:
        results["arrivals"] = scenario
    if scaling:
        add_scaling(results, workspace, lm, bench, methods)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", results)
    write_report(results, out_dir)
    return results


def select_bench(bench_dir: Path, docs: int | None, limit: int | None):
    """The benchmark, cut to its first ``docs`` documents (and the questions they answer) and ``limit`` questions."""
    bench = load_bench(bench_dir)
    if docs:
        bench = bench.first_docs(docs)
        console.print(f"{bench.name}: the first {docs} documents and the {len(bench.questions)} questions they answer")
    if limit:
        bench.questions = bench.questions[:limit]
    return bench


def add_scaling(results: dict, workspace: Workspace, lm: LM, bench, methods: list[str]) -> None:
    """results.json's ``scaling``: context, rag and the first trained method's cost as the corpus grows."""
    from .compare import question_text
    from .scaling import scaling_study

    trained = [m for m in methods if m in TRAINED][:1]
    curve_methods = [m for m in ("context", "rag") if m in methods] + trained
    if curve_methods:
        console.rule("[bold]scaling study")
        sample = [question_text(q) for q in bench.questions[:3]]
        results["scaling"] = scaling_study(workspace, lm, sample, curve_methods)

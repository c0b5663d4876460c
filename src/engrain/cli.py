"""The ``engrain`` command line: one verb per pipeline stage.

Exit status: 0 success, 1 some input failed but the step went on, 2 bad usage or total failure.
Errors the user can fix are printed as a message (never a traceback); ``ENGRAIN_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .errors import EngrainError
from .memory.kinds import NAMES, canonical, methods_help, trained_help

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="engrain: make a language model know a folder of documents, and measure which way works.")
console = Console(stderr=True)

WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", help="workspace folder")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="base model: embedded default, folder, .gguf or hub id")]
ExcludeQuestionsOpt = Annotated[Optional[list[Path]], typer.Option("--exclude-questions", help="benchmark questions.jsonl "
                                                                  "to keep out of synthesis (repeatable)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object with the step's summary on stdout")]
HopsOpt = Annotated[Optional[int], typer.Option("--hops", help="only the questions joining this many documents "
                                                            "(2: the two-document ones)")]
ProbeFormOpt = Annotated[str, typer.Option("--probe-form", help="how cloze probes are asked: continuation (the sentence "
                                           "start as plain text, as the data sets intend) or chat (an instruction in "
                                           "the chat template)")]
DEFAULT_WS = Path("engrain-workspace")


def emit_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def model_spec(workspace: Path, model: str | None) -> str | None:
    """--model wins; else the workspace config's model; else the embedded default."""
    if model:
        return model
    from .config import load_config
    from .workspace import Workspace

    return load_config(Workspace.at(workspace).config_path).model.name


@app.command()
def ingest(
    docs_dir: Annotated[Path, typer.Argument(help="folder of documents (.txt .md .html .pdf .docx .json .jsonl)")],
    workspace: WorkspaceOpt = DEFAULT_WS,
    include: Annotated[Optional[list[str]], typer.Option("--include", help="glob to keep (repeatable)")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="glob to leave out (repeatable)")] = None,
    chunk_tokens: Annotated[Optional[int], typer.Option("--chunk-tokens", help="chunk size in tokens")] = None,
    chunk_overlap: Annotated[Optional[int], typer.Option("--chunk-overlap", help="overlap in tokens")] = None,
    max_file_mb: Annotated[Optional[float], typer.Option("--max-file-mb", help="skip larger files")] = None,
    model: ModelOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Turn a folder of documents into the corpus (incremental: only new or changed files are processed)."""
    from .corpus.ingest_cli import ingest_command

    code = ingest_command(docs_dir, workspace, include=include, exclude=exclude, chunk_tokens=chunk_tokens,
                          chunk_overlap=chunk_overlap, max_file_mb=max_file_mb, model=model, as_json=as_json,
                          emit=emit_json)
    if code:
        raise typer.Exit(code)


@app.command()
def index(
    workspace: WorkspaceOpt = DEFAULT_WS,
    embedding_model: Annotated[Optional[str], typer.Option("--embedding-model", help="sentence-transformers name or folder (default: embedded all-MiniLM-L6-v2)")] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="delete the index and embed every chunk again")] = False,
    eval_dir: Annotated[Optional[Path], typer.Option("--eval", help="benchmark folder: print retrieval recall@k of its gold docs")] = None,
    k: Annotated[int, typer.Option("--k", help="k for --eval recall@k")] = 5,
    mode: Annotated[Optional[str], typer.Option("--mode", help="hybrid | vector | bm25")] = None,
    rewrite_query: Annotated[Optional[bool], typer.Option("--rewrite-query/--no-rewrite-query", help="the model rewrites questions into search queries")] = None,
    model: ModelOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Embed the corpus's chunks into a LanceDB index with full-text search (incremental after a re-ingest)."""
    from .rag.cli import index_command

    code = index_command(workspace, embedding_model=embedding_model, rebuild=rebuild, eval_dir=eval_dir, k=k,
                         mode=mode, rewrite_query=rewrite_query, model=model, as_json=as_json, emit=emit_json)
    if code:
        raise typer.Exit(code)


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="the question")],
    workspace: WorkspaceOpt = DEFAULT_WS,
    memory: Annotated[str, typer.Option("--memory", help=f"{' | '.join(NAMES)} | X+rag (base: closed-book)")] = "base",
    model: ModelOpt = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens")] = 96,
    as_json: JsonOpt = False,
) -> None:
    """Answer one question with a memory (the base model closed-book by default)."""
    from .memory.registry import open_memory
    from .models import load_for_workspace
    from .workspace import Workspace

    if not question.strip():
        raise EngrainError("The question is empty.", hint='Usage: engrain ask "your question"')
    ws = Workspace.at(workspace)
    memory = canonical(memory)  # an old name still works, with a notice
    lm = load_for_workspace(workspace, model)
    mem = open_memory(memory, ws, lm)
    ans = mem.answer([question], max_new_tokens=max_tokens)[0]
    if as_json:
        emit_json({"answer": ans.text, "memory": memory, "chunks": ans.chunks, "latency_ms": round(ans.latency_ms, 1),
                   "prompt_tokens": ans.prompt_tokens, **ans.meta})
    else:
        print(ans.text)
        console.print(f"[dim]{memory} · {ans.latency_ms:.0f} ms · {ans.prompt_tokens} prompt tokens"
                      + (f" · chunks {', '.join(ans.chunks)}" if ans.chunks else "")
                      + (" · far from the documents: base weights" if ans.meta.get("weights") == "base" else "") + "[/dim]")


@app.command()
def compare(
    bench: Annotated[Path, typer.Argument(help="benchmark folder: docs/ + questions.jsonl (BENCHMARKS.md)")],
    workspace: WorkspaceOpt = DEFAULT_WS,
    methods: Annotated[str, typer.Option("--methods", help=f"comma-separated: {methods_help()}")] = "base",
    out: Annotated[Optional[Path], typer.Option("--out", help="output folder (default WS/reports/<bench>)")] = None,
    model: ModelOpt = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="only the first N questions")] = None,
    docs: Annotated[Optional[int], typer.Option("--docs", help="only the first N documents (by path) and the "
                                                               "questions they answer")] = None,
    latency_sample: Annotated[int, typer.Option("--latency-sample", help="questions timed one at a time")] = 10,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="rebuild memories even if the workspace has them")] = False,
    no_forgetting: Annotated[bool, typer.Option("--no-forgetting", help="skip the forgetting probes")] = False,
    scaling: Annotated[bool, typer.Option("--scaling", help="also measure cost as the corpus grows (1k-8k tokens)")] = False,
    probe_form: ProbeFormOpt = "continuation",
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML settings (engrain.yaml's layout, any "
                                                                    "subset) merged into the workspace's config "
                                                                    "first: how a committed experiment is rerun")] = None,
    against: Annotated[Optional[str], typer.Option("--against", help="FILE:METHOD from an earlier run: every method "
                                                                     "here is also tested against it, question by "
                                                                     "question")] = None,
    arrivals: Annotated[Optional[int], typer.Option("--arrivals", help="the documents arrive in N batches: the trained "
                                                    "method is trained on the first and updated on each next "
                                                    "(engrain update), then held to a rebuild")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare methods side by side on a benchmark; writes results.json, report.md and report.html."""
    from .evaluate.compare import check_probe_form
    from .evaluate.report import print_results
    from .evaluate.run import parse_methods, run_compare
    from .models import load_for_workspace
    from .workspace import Workspace

    check_probe_form(probe_form)  # before the model loads
    if against is not None:
        from .evaluate.paired import check_reference

        check_reference(against)
    ws = Workspace.at(workspace).ensure()
    if config is not None:
        from .config import apply_settings

        apply_settings(ws.config_path, config)
    from .evaluate.bench import subset_name

    out_dir = out or ws.reports_dir / subset_name(bench.name, docs)
    lm = load_for_workspace(workspace, model)
    results = run_compare(bench, ws, parse_methods(methods), out_dir, lm, limit=limit, latency_sample=latency_sample,
                          seed=seed, rebuild=rebuild, measure_forgetting=not no_forgetting,
                          scaling=scaling, docs=docs, probe_form=probe_form, arrivals=arrivals)
    print_results(results, out_dir, console)
    if against is not None:
        from .atomic import write_json
        from .evaluate.bench import load_bench
        from .evaluate.paired import markdown, run_against

        questions = (load_bench(bench).first_docs(docs) if docs else load_bench(bench)).questions
        results["against"] = run_against(results, questions, against)  # each method against FILE:METHOD
        console.print(markdown(results["against"]))

        write_json(out_dir / "results.json", results)
    if as_json:
        emit_json({"results": str(out_dir / "results.json"), "report": str(out_dir / "report.html"),
                   "methods": {k: {"contains": v["contains"], "contains_ci": v["contains_ci"], "f1": v["f1"],
                                   "latency_ms_p50": v["latency_ms_p50"]} for k, v in results["methods"].items()}})


@app.command()
def paired(
    bench: Annotated[Path, typer.Argument(help="the benchmark folder every run answered, or 'general': the "
                                               "general questions forgetting is measured on, as each run's "
                                               "trained weights answered them")],
    runs: Annotated[list[str], typer.Argument(help="FILE:METHOD, e.g. OUT/results.json:lora")],
    against: Annotated[str, typer.Option("--against", help="FILE:METHOD every run is tested against")],
    docs: Annotated[Optional[int], typer.Option("--docs", help="the runs' --docs")] = None,
    hops: HopsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Methods from separate runs tested question by question against one reference: paired bootstrap interval of
    the difference, questions won and lost, McNemar's exact p."""
    from .evaluate.paired import against as test, bench_questions, is_general, markdown, read_run

    questions = bench_questions(bench, docs, hops)
    general = is_general(bench)
    table = test(against, [read_run(spec, questions, general) for spec in runs], questions, general)
    if as_json:
        emit_json(table)
    else:
        print(markdown(table))


@app.command()
def pooled(
    bench: Annotated[Path, typer.Argument(help="the benchmark folder every run answered, or 'general' (see "
                                               "`engrain paired`)")],
    pairs: Annotated[list[str], typer.Argument(help="TREATED=CONTROL, each FILE:METHOD: a change and its control "
                                                     "trained with the same seed; one pair per seed")],
    docs: Annotated[Optional[int], typer.Option("--docs", help="the runs' --docs")] = None,
    hops: HopsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A change measured on several seeds, each against its own control, tested as one: each pair's paired test,
    then the mean difference over all pairs with an exact sign-flip p that keeps each question's runs together."""
    from .evaluate.paired import bench_questions, is_general, pooled as test, pooled_markdown

    questions = bench_questions(bench, docs, hops)
    table = test(pairs, questions, is_general(bench))
    if as_json:
        emit_json(table)
    else:
        print(pooled_markdown(table))


@app.command()
def demo(
    workspace: WorkspaceOpt = Path("engrain-demo"),
    methods: Annotated[Optional[str], typer.Option("--methods", help="default: every method this version can build")] = None,
    model: ModelOpt = None,
    probe_form: ProbeFormOpt = "continuation",
    rebuild: Annotated[bool, typer.Option("--rebuild", help="rebuild memories even if the workspace has them")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The whole pipeline on the bundled example corpus with the embedded model, ending with the results table."""
    from .demo import DEMO_LATENCY_SAMPLE, DEMO_METHODS, example_bench, write_demo_config
    from .evaluate.compare import check_probe_form
    from .evaluate.report import print_results
    from .evaluate.run import parse_methods, run_compare
    from .models import load_for_workspace
    from .workspace import Workspace

    check_probe_form(probe_form)  # before the model loads
    bench = example_bench()
    ws = Workspace.at(workspace).ensure()
    if not ws.config_path.exists():
        write_demo_config(ws.config_path)
    out_dir = ws.reports_dir / bench.name
    lm = load_for_workspace(workspace, model)
    results = run_compare(bench, ws, parse_methods(methods or DEMO_METHODS), out_dir, lm,
                          latency_sample=DEMO_LATENCY_SAMPLE, probe_form=probe_form, rebuild=rebuild)
    print_results(results, out_dir, console)
    if as_json:
        emit_json({"results": str(out_dir / "results.json"), "report": str(out_dir / "report.html")})


@app.command()
def doctor(as_json: JsonOpt = False) -> None:
    """Print versions, threads, cache state, devices and bf16 support: what a bug report needs."""
    from .doctor import collect

    info = collect()
    if as_json:
        emit_json(info)
        return
    from rich.table import Table

    table = Table(title="engrain doctor", show_header=False)
    for key, value in info.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    Console().print(table)


@app.command()
def synth(
    workspace: WorkspaceOpt = DEFAULT_WS,
    strategies: Annotated[Optional[str], typer.Option("--strategies", help="comma list: facts,qa,rephrase,implications,entities")] = None,
    generator: Annotated[Optional[str], typer.Option("--generator", help="http(s)://... OpenAI-compatible server, or a model spec")] = None,
    generator_model: Annotated[Optional[str], typer.Option("--generator-model", help="model name for an HTTP generator")] = None,
    model: ModelOpt = None,
    per_chunk: Annotated[Optional[int], typer.Option("--per-chunk", help="accepted items per chunk per model strategy")] = None,
    exclude_questions: ExcludeQuestionsOpt = None,
    grounding: Annotated[Optional[str], typer.Option("--grounding", help="off | lenient | strict")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show the plan and estimates; generate nothing")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Make grounded synthetic training data from the corpus (append-only, resumable)."""
    from .synth.cli import synth_command

    code = synth_command(workspace, strategies=strategies, generator=generator, generator_model=generator_model,
                         model=model_spec(workspace, model), per_chunk=per_chunk, exclude_questions=exclude_questions,
                         grounding=grounding, seed=seed, dry_run=dry_run, as_json=as_json, emit=emit_json)
    if code:
        raise typer.Exit(code)


@app.command()
def train(
    workspace: WorkspaceOpt = DEFAULT_WS,
    memory: Annotated[str, typer.Option("--memory", help=trained_help())] = "lora",
    model: ModelOpt = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="stop after N optimizer steps")] = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="passes over the data (when no --max-steps)")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="peak learning rate (default: the memory's own)")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="folder under memories/ (default: the memory)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print steps, tokens, time and memory; train nothing")] = False,
    force: Annotated[bool, typer.Option("--force", help="train again although the config changed")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a parametric memory on the workspace's synthetic data (resumes an interrupted run)."""
    from .config import load_config
    from .train.loop import train as run_training
    from .workspace import Workspace

    ws = Workspace.at(workspace)
    cfg = load_config(ws.config_path)
    memory = canonical(memory)  # an old name still works, with a notice
    overrides = {"memory": memory, "max_steps": max_steps, "epochs": epochs, "lr": lr, "name": name}
    tcfg = cfg.train.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    summary = run_training(ws, tcfg, model or cfg.model.name, force=force, dry_run=dry_run)
    if as_json:
        emit_json(summary)
        return
    if dry_run:
        from rich.table import Table

        table = Table(title=f"engrain train --dry-run ({memory})", show_header=False)
        for key, value in summary.items():
            table.add_row(key, str(value))
        Console().print(table)
    elif summary.get("already_trained"):
        console.print(f"{summary['out']} is already trained with this config (pass --force to train again)")
    else:
        console.print(f"trained [bold]{summary['memory']}[/bold]: {summary['steps']} steps, "
                      f"loss {summary['final_train_loss']:.3f}, {summary['tokens_per_s']:.0f} tokens/s, "
                      f"{summary['train_seconds']:.0f} s -> {summary['out']}")


@app.command()
def update(
    workspace: WorkspaceOpt = DEFAULT_WS,
    memory: Annotated[Optional[str], typer.Option("--memory", help="the trained memory (folder under memories/) to "
                                                                   "update; default: train.name, else train.memory")] = None,
    model: ModelOpt = None,
    force: Annotated[bool, typer.Option("--force", help="start an interrupted update over although the corpus or "
                                                        "settings changed since")] = False,
    exclude_questions: ExcludeQuestionsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Teach a trained memory the documents added or changed since it was trained (after `engrain ingest`), with
    rehearsal of what it learned; resumes an interrupted update. Removed documents are reported, not unlearned."""
    from .config import load_config
    from .train.update import update as run_update
    from .workspace import Workspace

    ws = Workspace.at(workspace)
    cfg = load_config(ws.config_path)
    # --memory names a folder, taken as written (a memory saved under a kind's old name keeps that folder name).
    summary = run_update(ws, cfg, model or cfg.model.name, name=memory, force=force, show_progress=not as_json,
                         exclude_questions=exclude_questions)
    if as_json:
        emit_json(summary)
        return
    record = summary["update"]
    docs = record["documents"]
    removed = f", {len(docs['removed'])} {docs['removed_note']}" if docs["removed"] else ""
    if summary.get("nothing_to_do"):
        console.print(f"{summary['out']} has learned every document of the corpus; nothing to update")
    elif "steps" not in record:
        console.print(f"updated [bold]{summary['memory']}[/bold] without training: {len(docs['new'])} new, "
                      f"{len(docs['changed'])} changed documents with nothing to train on{removed}")
    else:
        items = record["items"]
        console.print(f"updated [bold]{summary['memory']}[/bold]: {len(docs['new'])} new, {len(docs['changed'])} "
                      f"changed documents{removed}; {record['steps']} steps on {items['new']} new and "
                      f"{items['rehearsed']} rehearsed items, {record['seconds']:.0f} s -> {summary['out']}")


@app.command()
def export(
    workspace: WorkspaceOpt = DEFAULT_WS,
    memory: Annotated[str, typer.Option("--memory", help="the trained memory to export (lora or full)")] = "lora",
    out: Annotated[Path, typer.Option("--out", help="folder to write the merged model to")] = Path("merged-model"),
    merge: Annotated[bool, typer.Option("--merge", help="merge the adapter into the base weights")] = True,
    vllm: Annotated[bool, typer.Option("--vllm", help="print the vLLM command that serves the LoRA memories as they are")] = False,
    model: ModelOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a trained memory merged into the base model as a Hugging Face model folder (with its tokenizer),
    or with --vllm print the `vllm serve` command line that serves every LoRA memory without merging."""
    from .export import export_merged, vllm_command
    from .workspace import Workspace

    if vllm:
        info = vllm_command(Workspace.at(workspace), model)
        if as_json:
            emit_json(info)
        else:
            print(info["command"])
        return
    if not merge:
        raise EngrainError("Only --merge export is supported.",
                           hint="The adapter folder itself (memories/NAME) is already in PEFT layout.")
    info = export_merged(Workspace.at(workspace), memory, out, model_spec(workspace, model))
    if as_json:
        emit_json(info)
    else:
        console.print(f"wrote a merged model to {info['out']}")


@app.command()
def serve(
    workspace: WorkspaceOpt = DEFAULT_WS,
    host: Annotated[str, typer.Option("--host", help="address to listen on; beyond loopback an API key is required")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="ENGRAIN_API_KEY",
                                                   help="bearer key clients must send (or set ENGRAIN_API_KEY)")] = None,
    model: ModelOpt = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="most requests of one memory in a forward pass")] = 8,
    max_tokens: Annotated[int, typer.Option("--max-tokens-limit", help="largest max_tokens a request may ask")] = 512,
    lora_adapters: Annotated[bool, typer.Option("--lora-adapters", help="LoRA memories as adapters of one model: less "
                                                                        "memory, slower answers (default: merged)")] = False,
    reuse_chunks: Annotated[bool, typer.Option("--reuse-chunks", help="reuse retrieved chunks' KV in any order: "
                                                                      "faster rag, approximate (docs/serving.md)")] = False,
) -> None:
    """Serve every memory of the workspace as an OpenAI-compatible API, with a playground page at /."""
    from .serve.app import check_bind, serve as run_server

    check_bind(host, api_key)
    run_server(workspace, model_spec(workspace, model), host=host, port=port, api_key=api_key, max_batch=max_batch,
               max_tokens_limit=max_tokens, log=lambda msg: console.print(msg, markup=False), lora_adapters=lora_adapters,
               reuse_chunks=reuse_chunks)


def main() -> None:
    """Entry point: run the app, turning user-fixable errors into a message and exit status 2."""
    # PEFT asks transformers for a deprecated alias whenever it wraps a model: a warning about those two libraries,
    # not about anything the user ran, so it stays out of every training and serving log.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        code = app(standalone_mode=False)  # without standalone mode click returns typer.Exit's code, not raises
        if isinstance(code, int) and code:
            sys.exit(code)
    except EngrainError as exc:
        if os.environ.get("ENGRAIN_DEBUG"):
            raise
        console.print(f"[bold red]error:[/bold red] {exc.message}")
        if exc.hint:
            console.print(exc.hint)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("[yellow]interrupted[/yellow]")
        sys.exit(130)
    except Exception as exc:  # click usage errors and anything unexpected
        import click

        # typer now vendors click: its usage errors derive from typer.TyperException, no longer click's
        if isinstance(exc, getattr(typer, "TyperException", click.ClickException)) and hasattr(exc, "show"):
            exc.show()
            sys.exit(2)
        if os.environ.get("ENGRAIN_DEBUG"):
            raise
        console.print(f"[bold red]error:[/bold red] {type(exc).__name__}: {exc}")
        console.print("This is a bug in engrain or an unexpected environment; rerun with ENGRAIN_DEBUG=1 for details "
                      "and include `engrain doctor` output in a report.")
        sys.exit(2)


if __name__ == "__main__":
    main()

"""The comparison report: report.md and a self-contained report.html (plots embedded as PNG data URIs).

The "what this means" paragraph is generated from the numbers, never written by hand.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from ..atomic import write_text
from . import metrics


def _fmt_ci(ci: list[float]) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def fmt_paired(paired: dict | None) -> str:
    """``+0.067 [+0.02, +0.11] p=0.004``: a paired difference in contains, or '' where there is none."""
    if not paired:
        return ""
    lo, hi = paired["diff_ci"]
    return f"{paired['diff']:+.3f} [{lo:+.2f}, {hi:+.2f}] p={paired['p_value']:.2g}"


def paired(results: dict, a: str, b: str) -> dict | None:
    """``a`` against ``b`` question by question from results.json's per-question scores (None when a file
    written before those were recorded lacks them)."""
    answers = results.get("answers") or {}
    xs, ys = answers.get(a), answers.get(b)
    if not xs or not ys or len(xs) != len(ys) or any("contains" not in r for r in xs + ys):
        return None
    return metrics.paired_difference([r["contains"] for r in xs], [r["contains"] for r in ys])


def results_table(results: dict) -> list[dict]:
    """One row per method with the headline numbers (shared by md, html and the CLI)."""
    rows = []
    for name, m in results["methods"].items():
        forgetting = m.get("forgetting") or {}
        rows.append({
            "method": name, "contains": m["contains"], "contains_ci": m["contains_ci"], "em": m["em"], "f1": m["f1"],
            "p50_ms": m["latency_ms_p50"], "p95_ms": m["latency_ms_p95"], "prompt_tokens": m["prompt_tokens_mean"],
            "build_s": m["build_seconds"], "disk_mb": m.get("disk_bytes", 0) / 2**20, "peak_rss_mb": m["peak_rss_mb"],
            "general_qa_delta": forgetting.get("general_qa_delta"), "ppl_ratio": forgetting.get("perplexity_ratio"),
            "vs_base": m.get("vs_base"),
        })
    return rows


def interpretation(results: dict) -> str:
    """A short, number-driven reading of the results: who wins where, at what cost."""
    methods = results["methods"]
    if not methods:
        return "No method was run."
    best = max(methods, key=lambda k: methods[k]["contains"])
    b = methods[best]
    parts = [f"On {results['n_questions']} questions of '{results['bench']}', {best} answered best "
             f"(contains {b['contains']:.2f}, 95% CI {_fmt_ci(b['contains_ci'])}, "
             f"{b['latency_ms_p50']:.0f} ms median latency, {b['prompt_tokens_mean']:.0f} prompt tokens per question)."]
    # Same questions for every method: a paired test separates methods that overlapping intervals cannot. Files
    # without per-question scores fall back to the (more cautious) interval overlap.
    ties = []
    for k, m in methods.items():
        if k != best:
            pair = paired(results, best, k)
            tied = pair["diff_ci"][0] <= 0 if pair else m["contains_ci"][1] >= b["contains_ci"][0]
            if tied:
                ties.append(k)
    if ties:
        parts.append(f"Its lead over {', '.join(ties)} is within noise at this many questions (the 95% interval of "
                     "the paired difference, or of the scores, includes no difference).")
    if "base" in methods:
        above = [k for k, m in methods.items() if (m.get("vs_base") or {}).get("diff_ci", [0])[0] > 0]
        level = [k for k, m in methods.items() if k != "base" and m.get("vs_base") and k not in above]
        if above:
            parts.append(f"Against the untrained model closed-book ({methods['base']['contains']:.2f}), "
                         f"{', '.join(above)} answered significantly more (paired 95% interval above zero): that "
                         "gain comes from the documents.")
        if level:
            parts.append(f"{', '.join(level)} did not separate from the untrained model.")
    cheap = [k for k, m in methods.items() if k != best and m["prompt_tokens_mean"] < 0.5 * b["prompt_tokens_mean"]
             and m["contains"] >= 0.8 * b["contains"] and m["contains"] > 0]
    if cheap:
        k = min(cheap, key=lambda x: methods[x]["prompt_tokens_mean"])
        parts.append(f"{k} reaches {methods[k]['contains']:.2f} with {methods[k]['prompt_tokens_mean']:.0f} prompt tokens "
                     f"per question: most of the accuracy at a fraction of the prompt cost.")
    by_hops = {k: m["by_hops"].get("2", {}).get("contains") for k, m in methods.items() if "2" in m.get("by_hops", {})}
    if by_hops:
        k = max(by_hops, key=lambda x: by_hops[x])
        parts.append(f"On questions needing two documents, {k} did best ({by_hops[k]:.2f}).")
    for k, m in methods.items():
        f = m.get("forgetting")
        if f and f.get("general_qa_delta") is not None:
            parts.append(f"{k}'s weights changed general-knowledge accuracy by {100 * f['general_qa_delta']:+.1f} "
                         f"points and general-text perplexity by x{f.get('perplexity_ratio', float('nan')):.2f}.")
            if f.get("gated_general_qa_delta") is not None:
                parts.append(f"Answering through its relevance gate, which sent "
                             f"{100 * f['gate_general_to_memory']:.0f}% of the general questions to the trained "
                             f"weights, {k} changed it by {100 * f['gated_general_qa_delta']:+.1f} points.")
    return " ".join(parts)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plots(results: dict) -> dict[str, str]:
    """Named base64 PNGs: accuracy with CI bars, accuracy vs latency, accuracy by hops, forgetting, scaling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    names = list(methods)
    out: dict[str, str] = {}

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    vals = [methods[n]["contains"] for n in names]
    err = [[v - methods[n]["contains_ci"][0] for n, v in zip(names, vals)],
           [methods[n]["contains_ci"][1] - v for n, v in zip(names, vals)]]
    ax.bar(names, vals, yerr=err, capsize=4, color="#4C72B0")
    ax.set_ylabel("contains (95% CI)")
    ax.set_ylim(0, 1)
    ax.set_title("Accuracy by method")
    out["accuracy"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for n in names:
        ax.scatter(max(1.0, methods[n]["latency_ms_p50"]), methods[n]["contains"], s=40)
        ax.annotate(n, (max(1.0, methods[n]["latency_ms_p50"]), methods[n]["contains"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("median latency per question (ms, log)")
    ax.set_ylabel("contains")
    ax.set_ylim(0, 1)
    ax.set_title("Accuracy vs latency")
    out["accuracy_vs_latency"] = _png(fig)

    hops = sorted({h for n in names for h in methods[n].get("by_hops", {})})
    if hops:
        fig, ax = plt.subplots(figsize=(6.5, 3.2))
        width = 0.8 / max(1, len(hops))
        for i, h in enumerate(hops):
            ax.bar([j + i * width for j in range(len(names))],
                   [methods[n]["by_hops"].get(h, {}).get("contains", 0) for n in names], width, label=f"hops={h}")
        ax.set_xticks([j + width * (len(hops) - 1) / 2 for j in range(len(names))], names)
        ax.set_ylim(0, 1)
        ax.set_ylabel("contains")
        ax.legend(fontsize=8)
        ax.set_title("Accuracy by hops")
        out["accuracy_by_hops"] = _png(fig)

    forgetting = {n: methods[n]["forgetting"] for n in names if methods[n].get("forgetting")}
    if forgetting:
        fig, ax = plt.subplots(figsize=(6.5, 3.2))
        ks = list(forgetting)
        ax.bar(ks, [100 * forgetting[k].get("general_qa_delta", 0) for k in ks], color="#C44E52")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel("general-knowledge accuracy change (points)")
        ax.set_title("Forgetting")
        out["forgetting"] = _png(fig)

    scaling = results.get("scaling")
    if scaling:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for method, points in scaling.items():
            xs = [p["corpus_tokens"] for p in points]
            axes[0].plot(xs, [p["latency_ms_p50"] for p in points], marker="o", label=method)
            axes[1].plot(xs, [p["prompt_tokens_mean"] for p in points], marker="o", label=method)
        axes[0].set_ylabel("median latency (ms)")
        axes[1].set_ylabel("prompt tokens per question")
        for ax in axes:
            ax.set_xlabel("corpus tokens")
            ax.legend(fontsize=8)
        fig.suptitle("Cost as the corpus grows")
        out["scaling"] = _png(fig)
    if results.get("arrivals"):
        out["retention"] = _png(retention_figure(results["arrivals"]))
    return out


def retention_figure(scenario: dict):
    """Accuracy on each batch after every arrival (a batch's line starts at its own arrival), the rebuild on all
    documents for reference, and general QA's change beside it."""
    import matplotlib.pyplot as plt

    steps = scenario["steps"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.2))
    for b in range(1, len(steps) + 1):
        xs = [s["arrival"] for s in steps if str(b) in s["by_batch"]]
        ax.plot(xs, [s["by_batch"][str(b)]["contains"] for s in steps if str(b) in s["by_batch"]], marker="o",
                label=f"batch {b}")
    ax.axhline(scenario["rebuild"]["contains"], color="gray", linestyle="--", linewidth=1, label="rebuild, all")
    ax.set_xlabel("after arrival")
    ax.set_ylabel("contains")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("Retention")
    bx.bar([s["arrival"] for s in steps], [100 * s["forgetting"]["general_qa_delta"] for s in steps], color="#C44E52")
    bx.axhline(0, color="black", linewidth=0.8)
    bx.set_xlabel("after arrival")
    bx.set_ylabel("general QA change (points)")
    bx.set_title("Forgetting")
    for axis in (ax, bx):
        axis.set_xticks([s["arrival"] for s in steps])
    fig.tight_layout()
    return fig


def arrivals_markdown(scenario: dict) -> list[str]:
    """The scenario's table: one row per arrival, the rebuild, and the measures it is held to."""
    steps = scenario["steps"]
    n = len(steps)
    lines = ["## Arrivals", "", f"The documents arrived in {n} batches; the `{scenario['memory']}` memory was trained "
             "on the first and updated on each next (`engrain update`). Accuracy (contains) on each batch's questions "
             "after every arrival:", "",
             "| after arrival | documents | seconds | train tokens | " + " | ".join(f"batch {b}" for b in range(1, n + 1))
             + " | all so far | changed facts: new / old value | general QA Δ | ppl ratio |", "|---" * (n + 8) + "|"]
    for s in steps:
        cells = [_cell(s["by_batch"].get(str(b))) for b in range(1, n + 1)]
        changed = s.get("changed_facts") or {}
        moved = "" if not changed.get("n") else (f"{changed['new_value']:.2f} / {changed['old_value']:.2f} "
                                                 f"(n={changed['n']})")
        lines.append(f"| {s['arrival']} | {len(s['documents'])} | {s['seconds']:.0f} | {s.get('train_tokens') or ''} | "
                     + " | ".join(cells) + f" | {s['seen']['contains']:.3f} | {moved} | "
                     + " | ".join(general_cells(s["forgetting"])) + " |")
    for e in scenario.get("edits") or []:
        lines.append(f"\nBefore arrival {e['arrival']}, `{e['doc']}` was edited: \"{e['swapped'][0]}\" and "
                     f"\"{e['swapped'][1]}\" swapped (questions {', '.join(e['questions'])}); questions mentioning either "
                     "value are left out of the batch columns.")
    ref = scenario["rebuild"]
    lines += ["", f"Rebuilt from nothing on all documents: contains {ref['contains']:.3f} {_fmt_ci(ref['contains_ci'])}, "
              f"{ref['seconds']:.0f} s, general QA {general_cells(ref['forgetting'])[0]} points; the "
              f"updated memory against it: {fmt_paired(scenario['updated_vs_rebuild'])}.", "",
              "| measure | value |", "|---|---|"]
    for key, value in scenario["measures"].items():
        lines.append(f"| {key.replace('_', ' ')} | {'' if value is None else f'{value:.3f}'} |")
    return lines + [""]


PROBE_FORM_WORDS = {"continuation": "the sentence start as plain text, continued by the model",
                    "chat": "an instruction to complete the sentence, in the chat template"}


def probe_form_line(results: dict) -> str:
    """One line saying how cloze probes were asked (results from before the setting existed used the chat form)."""
    form = results.get("probe_form", "chat")
    return f"Cloze probes asked as {form}: {PROBE_FORM_WORDS.get(form, form)}."


def general_cells(forgetting: dict | None) -> tuple[str, str]:
    """A memory's general QA change (as answered through its relevance gate, and by the trained weights alone) and
    perplexity ratio, as table cells (empty for a memory whose forgetting was not measured)."""
    f = forgetting or {}
    gq = "" if f.get("general_qa_delta") is None else f"{100 * f['general_qa_delta']:+.1f}"
    if f.get("gated_general_qa_delta") is not None:
        gq = f"{100 * f['gated_general_qa_delta']:+.1f} gated ({gq} weights)"
    return gq, "" if f.get("perplexity_ratio") is None else f"{f['perplexity_ratio']:.2f}"


def markdown(results: dict) -> str:
    lines = [f"# engrain comparison: {results['bench']}", "",
             f"{results['n_questions']} questions · model `{results['model']}` · {results['created']}", "",
             probe_form_line(results), "",
             "## What this means", "", interpretation(results), "", "## Results", "",
             "| method | contains (95% CI) | EM | F1 | p50 ms | p95 ms | prompt tokens | build s | disk MB | peak RSS MB "
             "| general QA Δ | ppl ratio | vs base (paired) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = results_table(results)
    for r in rows:
        gq, pr = general_cells(results["methods"][r["method"]].get("forgetting"))
        lines.append(f"| {r['method']} | {r['contains']:.3f} {_fmt_ci(r['contains_ci'])} | {r['em']:.3f} | {r['f1']:.3f} "
                     f"| {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['prompt_tokens']:.0f} | {r['build_s']:.0f} "
                     f"| {r['disk_mb']:.1f} | {r['peak_rss_mb']:.0f} | {gq} | {pr} | {fmt_paired(r['vs_base'])} |")
    if any(r["vs_base"] for r in rows):
        lines += ["", "vs base: the difference in contains against the untrained model on the same questions, its "
                  "95% paired bootstrap interval, and McNemar's exact p-value."]
    methods = results["methods"]
    lines += ["", "## By hops", "", "| method | " + " | ".join(f"hops={h}" for h in _keys(methods, "by_hops")) + " |",
              "|---|" + "---|" * len(_keys(methods, "by_hops"))]
    for name, m in methods.items():
        lines.append(f"| {name} | " + " | ".join(_cell(m["by_hops"].get(h)) for h in _keys(methods, "by_hops")) + " |")
    tags = _keys(methods, "by_tag")
    lines += ["", "## By tag", "", "| method | " + " | ".join(tags) + " |", "|---|" + "---|" * len(tags)]
    for name, m in methods.items():
        lines.append(f"| {name} | " + " | ".join(_cell(m["by_tag"].get(t)) for t in tags) + " |")
    if results.get("arrivals"):
        lines += [""] + arrivals_markdown(results["arrivals"])
    if results.get("examples"):
        lines += ["", "## Examples", ""]
        for ex in results["examples"]:
            lines.append(f"**{ex['question']}** (gold: {' / '.join(ex['answers'])})")
            lines.append("")
            for name in methods:
                lines.append(f"- {name}: {ex.get(name, '')!s}".replace("\n", " "))
            lines.append("")
    if results.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in results["warnings"]]
    env = results.get("environment", {})
    lines += ["", "## Reproduce", "", f"seed {env.get('seed')}, engrain {env.get('engrain')}, "
              f"versions {env.get('versions')}, settings `{env.get('settings')}`", ""]
    return "\n".join(lines)


def _keys(methods: dict, field: str) -> list[str]:
    return sorted({k for m in methods.values() for k in m.get(field, {})})


def _cell(entry: dict | None) -> str:
    return "" if not entry else f"{entry['contains']:.2f} (n={entry['n']})"


def write_report(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write report.md, report.html and the plots as PNG files; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown(results)
    images = plots(results)
    paths = {"md": out_dir / "report.md", "html": out_dir / "report.html"}
    write_text(paths["md"], md)
    for name, data in images.items():
        (out_dir / f"{name}.png").write_bytes(base64.b64decode(data))
    body = [f"<h1>engrain comparison: {html.escape(results['bench'])}</h1>",
            f"<p>{results['n_questions']} questions · model <code>{html.escape(str(results['model']))}</code> · "
            f"{html.escape(results['created'])}</p>", f"<p>{html.escape(probe_form_line(results))}</p>",
            "<h2>What this means</h2>", f"<p>{html.escape(interpretation(results))}</p>", "<h2>Results</h2>",
            "<table><tr><th>method</th><th>contains (95% CI)</th><th>EM</th><th>F1</th><th>p50 ms</th><th>p95 ms</th>"
            "<th>prompt tokens</th><th>build s</th><th>disk MB</th><th>peak RSS MB</th><th>general QA Δ</th>"
            "<th>ppl ratio</th><th>vs base (paired)</th></tr>"]
    for r in results_table(results):
        gq, pr = general_cells(results["methods"][r["method"]].get("forgetting"))
        body.append(f"<tr><td>{html.escape(r['method'])}</td><td>{r['contains']:.3f} {_fmt_ci(r['contains_ci'])}</td>"
                    f"<td>{r['em']:.3f}</td><td>{r['f1']:.3f}</td><td>{r['p50_ms']:.0f}</td><td>{r['p95_ms']:.0f}</td>"
                    f"<td>{r['prompt_tokens']:.0f}</td><td>{r['build_s']:.0f}</td><td>{r['disk_mb']:.1f}</td>"
                    f"<td>{r['peak_rss_mb']:.0f}</td><td>{gq}</td><td>{pr}</td><td>{fmt_paired(r['vs_base'])}</td></tr>")
    body.append("</table>")
    if results.get("arrivals"):  # the scenario's table as text; its retention plot is among the images
        body.append(f"<pre>{html.escape(chr(10).join(arrivals_markdown(results['arrivals'])))}</pre>")
    for name, data in images.items():
        body.append(f"<h2>{html.escape(name.replace('_', ' '))}</h2><img alt='{name}' src='data:image/png;base64,{data}'>")
    if results.get("examples"):
        names = list(results["methods"])
        body.append("<h2>Examples</h2><table><tr><th>question</th><th>gold</th>"
                    + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>")
        for ex in results["examples"]:
            body.append(f"<tr><td>{html.escape(ex['question'])}</td><td>{html.escape(' / '.join(ex['answers']))}</td>"
                        + "".join(f"<td>{html.escape(str(ex.get(n, '')))}</td>" for n in names) + "</tr>")
        body.append("</table>")
    if results.get("warnings"):
        body.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in results["warnings"]) + "</ul>")
    env = results.get("environment", {})
    body.append(f"<h2>Reproduce</h2><pre>{html.escape(str(env))}</pre>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left;vertical-align:top}img{max-width:100%}")
    write_text(paths["html"], f"<!doctype html><html><head><meta charset='utf-8'><title>engrain report: "
               f"{html.escape(results['bench'])}</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    return paths


def print_results(results: dict, out_dir: Path, console) -> None:
    """The comparison as a table on ``console`` (rich), and where its report was written."""
    from rich.table import Table

    table = Table(title=f"{results['bench']}: {results['n_questions']} questions, model {results['model']}")
    for col in ("method", "contains (95% CI)", "EM", "F1", "p50 ms", "prompt tok", "build s", "vs base (paired)"):
        table.add_column(col)
    for r in results_table(results):
        table.add_row(r["method"], f"{r['contains']:.3f} [{r['contains_ci'][0]:.2f}, {r['contains_ci'][1]:.2f}]",
                      f"{r['em']:.3f}", f"{r['f1']:.3f}", f"{r['p50_ms']:.0f}", f"{r['prompt_tokens']:.0f}",
                      f"{r['build_s']:.0f}", fmt_paired(r["vs_base"]))
    console.print(table)
    console.print(f"report: {out_dir / 'report.html'}")

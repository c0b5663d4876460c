"""engrain compare: metrics, intervals, benchmark validation, the leak check, results.json and the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from bench_folder import write_bench

from engrain.errors import EngrainError
from engrain.evaluate import metrics
from engrain.evaluate.bench import load_bench
from engrain.evaluate.compare import question_text, score
from engrain.evaluate.bench import Question
from engrain.memory.base import Answer

DOCS = {
    "veltrix": "# Veltrix Systems\n\nVeltrix Systems was established in 2011 in the town of Tarnholm by Mara Olsen. "
               "Its first product was the Lumen router.\n",
    "lumen": "# Lumen router\n\nThe Lumen router weighs 740 grams. It was designed by Ivo Brandt, who later led the "
             "Quarry lab.\n",
    "quarry": "# Quarry lab\n\nThe Quarry lab sits in Oskarvik and employs 38 researchers.\n",
}
QUESTIONS = [
    {"id": "q1", "type": "qa", "question": "Which person started Veltrix?", "answers": ["Mara Olsen", "Olsen"],
     "docs": ["veltrix"], "hops": 1, "tags": ["person"]},
    {"id": "q2", "type": "qa", "question": "How heavy is the Lumen?", "answers": ["740 grams", "740"],
     "docs": ["lumen"], "hops": 1, "tags": ["number"]},
    {"id": "q3", "type": "cloze", "question": "The Quarry lab sits in", "answers": ["Oskarvik"], "docs": ["quarry"],
     "hops": 1, "tags": ["place"]},
    {"id": "q4", "type": "qa", "question": "In which town is the lab led by the Lumen's designer?",
     "answers": ["Oskarvik"], "docs": ["lumen", "quarry"], "hops": 2, "tags": ["bridge"]},
]


@pytest.fixture()
def bench_dir(tmp_path):
    return write_bench(tmp_path / "mini", DOCS, QUESTIONS)


def test_squad_normalisation_and_metrics():
    assert metrics.normalize("The  Lumen-Router!") == "lumenrouter"
    assert metrics.contains("It was Mara Olsen, in 2011.", ["mara olsen"]) == 1.0
    assert metrics.contains("Olsenby", ["Olsen"]) == 0.0  # whole words only
    assert metrics.exact_match("the Oskarvik.", ["Oskarvik"]) == 1.0
    assert metrics.f1("in Oskarvik town", ["Oskarvik"]) == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert metrics.f1("", ["x"]) == 0.0


def test_confidence_intervals_cover_and_shrink():
    lo, hi = metrics.wilson_ci(0, 20)
    assert lo == 0.0 and 0.1 < hi < 0.2
    lo, hi = metrics.wilson_ci(50, 100)
    assert lo < 0.5 < hi
    wide = metrics.wilson_ci(5, 10)
    narrow = metrics.wilson_ci(500, 1000)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    lo, hi = metrics.bootstrap_ci([0.0, 1.0] * 50)
    assert lo < 0.5 < hi
    assert metrics.percentile([1, 2, 3, 4], 50) == 2.5


def test_paired_difference_separates_what_overlapping_intervals_cannot():
    # 150 questions: b right on 5, a right on the same 5 plus 10 more. The unpaired intervals overlap, but every
    # disagreement goes one way, which McNemar's test and the paired interval both see.
    b = [1.0] * 5 + [0.0] * 145
    a = [1.0] * 15 + [0.0] * 135
    assert metrics.wilson_ci(15, 150)[0] < metrics.wilson_ci(5, 150)[1]
    d = metrics.paired_difference(a, b)
    assert d["diff"] == pytest.approx(10 / 150) and (d["wins"], d["losses"], d["n"]) == (10, 0, 150)
    assert d["p_value"] == pytest.approx(2 / 2**10) and 0 < d["diff_ci"][0] < d["diff"] < d["diff_ci"][1]
    # Disagreements split evenly: no evidence either way.
    even = metrics.paired_difference([1.0, 0.0] * 10, [0.0, 1.0] * 10)
    assert even["diff"] == 0 and even["p_value"] == 1.0 and even["diff_ci"][0] < 0 < even["diff_ci"][1]
    assert metrics.mcnemar_p(0, 0) == 1.0 and metrics.mcnemar_p(3, 1) == pytest.approx(0.625)
    with pytest.raises(ValueError, match="same questions"):
        metrics.paired_difference([1.0], [1.0, 0.0])


def test_interpretation_reads_the_paired_tests():
    from engrain.evaluate.report import interpretation

    def method(scores, base=None):
        m = {"contains": sum(scores) / len(scores), "contains_ci": list(metrics.wilson_ci(sum(scores), len(scores))),
             "latency_ms_p50": 1.0, "prompt_tokens_mean": 10.0, "by_hops": {}}
        if base is not None:
            m["vs_base"] = metrics.paired_difference(scores, base)
        return m

    base = [1.0] * 5 + [0.0] * 145
    lora = [1.0] * 15 + [0.0] * 135            # base's 5 and 10 more: significantly above base
    # 10 right where base is wrong but 5 wrong where base is right, and 10 against 5 the other way against lora.
    memory = [0.0] * 5 + [1.0] * 5 + [0.0] * 135 + [1.0] * 5
    results = {"n_questions": 150, "bench": "b",
               "methods": {"base": method(base), "lora": method(lora, base), "memory_layer": method(memory, base)},
               "answers": {k: [{"contains": x} for x in v] for k, v in
                           (("base", base), ("lora", lora), ("memory_layer", memory))}}
    text = interpretation(results)
    assert "lora answered best" in text and "significantly more" in text
    assert "Its lead over memory_layer is within noise" in text
    assert "memory_layer did not separate from the untrained model" in text


def test_score_breaks_down_by_tag_and_hops():
    qs = [Question(**{k: v for k, v in q.items()}) for q in QUESTIONS]
    answers = [Answer("Mara Olsen", 1, 1), Answer("no idea", 1, 1), Answer("Oskarvik", 1, 1), Answer("Oslo", 1, 1)]
    s = score(qs, answers)
    assert s["contains"] == 0.5 and s["n"] == 4
    assert s["by_hops"]["1"]["contains"] == pytest.approx(2 / 3) and s["by_hops"]["1"]["n"] == 3
    assert s["by_hops"]["2"]["contains"] == 0.0
    assert s["by_tag"]["person"]["contains"] == 1.0
    assert s["contains_ci"][0] < 0.5 < s["contains_ci"][1]


def test_cloze_is_asked_as_a_completion():
    q = Question(**QUESTIONS[2])
    assert question_text(q).startswith("Complete the sentence") and "The Quarry lab sits in" in question_text(q)


def test_bad_benchmarks_name_file_line_and_field(tmp_path, bench_dir):
    with pytest.raises(EngrainError, match="does not exist"):
        load_bench(tmp_path / "nope")
    path = bench_dir / "questions.jsonl"
    lines = path.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["docs"] = ["missing-doc"]
    path.write_text("\n".join([lines[0], json.dumps(bad)]) + "\n")
    with pytest.raises(EngrainError, match=r"questions.jsonl:2: field 'docs'"):
        load_bench(bench_dir)
    path.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(EngrainError, match=r"questions.jsonl:2: not valid JSON"):
        load_bench(bench_dir)
    path.write_text(lines[0] + "\n" + lines[0] + "\n")
    with pytest.raises(EngrainError, match="duplicate id"):
        load_bench(bench_dir)


def test_compare_writes_results_contract_and_report(tmp_path, bench_dir, tiny_lm):
    from engrain.evaluate.run import run_compare
    from engrain.workspace import Workspace

    ws = Workspace.at(tmp_path / "ws").ensure()
    out = tmp_path / "out"
    results = run_compare(bench_dir, ws, ["base", "context", "rag"], out, tiny_lm, latency_sample=2,
                          max_new_tokens=8)
    saved = json.loads((out / "results.json").read_text())
    assert saved["n_questions"] == 4 and saved["bench"] == "mini"
    for name in ("base", "context", "rag"):
        m = saved["methods"][name]
        for key in ("contains", "em", "f1", "contains_ci", "latency_ms_p50", "latency_ms_p95", "prompt_tokens_mean",
                    "build_seconds", "peak_rss_mb", "forgetting", "by_tag", "by_hops"):
            assert key in m, (name, key)
        assert m["by_hops"]["2"]["n"] == 1
    # Documents in the prompt cost tokens; closed-book does not.
    assert saved["methods"]["context"]["prompt_tokens_mean"] > saved["methods"]["base"]["prompt_tokens_mean"]
    assert saved["methods"]["rag"]["build_seconds"] > 0
    assert all(a["chunks"] for a in saved["answers"]["rag"])
    # Every method but base is tested against base on the same questions, from per-question scores kept in the file.
    assert "vs_base" not in saved["methods"]["base"]
    for name in ("context", "rag"):
        paired = saved["methods"][name]["vs_base"]
        own = [a["contains"] for a in saved["answers"][name]]
        base = [a["contains"] for a in saved["answers"]["base"]]
        assert paired["diff"] == pytest.approx(sum(own) / 4 - sum(base) / 4) and paired["n"] == 4
        assert paired["wins"] == sum(x > y for x, y in zip(own, base)) and 0 <= paired["p_value"] <= 1
    assert "vs base (paired)" in (out / "report.md").read_text()
    assert saved["environment"]["seed"] == 0 and saved["environment"]["versions"]["torch"]
    # The host's CPU model: rows trained on two CPUs differ from the same seed, so each result names its own.
    assert saved["environment"]["cpu"]["model"] and "avx512_bf16" in saved["environment"]["cpu"]
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "What this means" in html
    assert (out / "report.md").read_text().count("| base |") >= 1
    assert results["methods"]["base"]["contains"] == saved["methods"]["base"]["contains"]


def test_compare_trains_lora_and_measures_forgetting(tmp_path, bench_dir, tiny_model_dir):
    """The whole parametric path through the CLI: ingest, facts synthesis, a short LoRA run, leak check, forgetting."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "engrain.yaml").write_text(yaml.safe_dump({
        "synth": {"strategies": ["facts"]},
        "train": {"max_steps": 2, "seq_len": 128, "micro_batch": 2, "replay_share": 0.0, "eval_every": 1000,
                  "save_every": 1000}}))
    out = tmp_path / "out"
    env = {**os.environ, "ENGRAIN_DEBUG": "1"}
    proc = subprocess.run([sys.executable, "-m", "engrain.cli", "compare", str(bench_dir), "-w", str(ws), "--methods",
                           "base,lora,lora+rag", "--model", str(tiny_model_dir), "--out", str(out),
                           "--latency-sample", "1", "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "results.json").read_text())
    lora = saved["methods"]["lora"]
    assert lora["build_seconds"] > 0 and lora["disk_bytes"] > 0
    f = lora["forgetting"]
    assert f["n_general_questions"] >= 100 and f["perplexity_before"] > 0 and "general_qa_delta" in f
    assert len(f["general_answers"]) == f["n_general_questions"]  # what `engrain paired general` tests
    assert saved["leak_check"]["items_checked"] > 0 and saved["leak_check"]["leaks"] == 0
    assert saved["methods"]["lora+rag"]["prompt_tokens_mean"] > lora["prompt_tokens_mean"]
    # the hybrid's forgetting is its weights' (closed-book), not retrieval distracting general questions
    def weights(forgot: dict) -> dict:
        return {k: v for k, v in forgot.items() if not k.startswith("gate")}

    hybrid = saved["methods"]["lora+rag"]["forgetting"]
    assert weights(hybrid) == weights(f) and f["measured_on"].startswith("the trained weights")
    # lora and lora+rag answer through the memory's relevance gate: general QA is measured that way too
    assert 0 <= f["gate_general_to_memory"] <= 1 and "gated_general_qa_delta" in f and "gated_general_qa_delta" in hybrid
    assert lora["describe"]["gate"]["threshold"] is not None
    # the memory's training as resolved: the config left pack_tokens unset, the result names LoRA's own row size
    assert lora["describe"]["train_config"]["pack_tokens"] == 128 and lora["describe"]["train_config"]["seed"] == 0
    assert saved["probe_form"] == "continuation" and saved["environment"]["settings"]["config"]["train"]["max_steps"] == 2
    assert (ws / "memories" / "lora" / "adapter_config.json").is_file()


def test_scaling_study_grows_context_cost_not_rag(tmp_path, bench_dir, tiny_lm):
    from engrain.corpus.ingest import ingest
    from engrain.evaluate.scaling import scaling_study
    from engrain.workspace import Workspace

    ws = Workspace.at(tmp_path / "ws").ensure()
    ingest(bench_dir / "docs", ws, model=tiny_lm.path)
    curves = scaling_study(ws, tiny_lm, ["Which person started Veltrix?"], ["context", "rag"], sizes=(100, 400),
                           max_new_tokens=4)
    small, large = curves["context"]
    assert large["corpus_tokens"] > small["corpus_tokens"] and large["repeated"]
    assert large["prompt_tokens_mean"] > small["prompt_tokens_mean"] + 150
    # RAG's prompt is bounded by top-k chunks, whatever the corpus size.
    assert curves["rag"][1]["prompt_tokens_mean"] < large["prompt_tokens_mean"]


def test_first_docs_keeps_only_questions_those_documents_answer(tmp_path, bench_dir, tiny_lm):
    from engrain.corpus.schema import read_documents
    from engrain.evaluate.run import run_compare
    from engrain.workspace import Workspace

    sub = load_bench(bench_dir).first_docs(2)  # lumen.md, quarry.md
    assert sub.doc_files == ["lumen.md", "quarry.md"] and sub.name == "mini-2docs"
    assert [q.id for q in sub.questions] == ["q2", "q3", "q4"]
    with pytest.raises(EngrainError, match="--docs is 0"):
        load_bench(bench_dir).first_docs(0)
    ws = Workspace.at(tmp_path / "ws").ensure()
    saved = run_compare(bench_dir, ws, ["context"], tmp_path / "out", tiny_lm, latency_sample=0, max_new_tokens=4,
                        docs=2)
    assert saved["n_questions"] == 3 and saved["environment"]["settings"]["doc_files"] == ["lumen.md", "quarry.md"]
    assert sorted(d.id for d in read_documents(ws)) == ["lumen", "quarry"]


def test_demo_writes_its_budgets_and_reports_on_the_example_corpus(tmp_path, tiny_model_dir):
    """`engrain demo` end to end on examples/acme with a tiny model (the real run is `make demo`)."""
    from typer.testing import CliRunner

    from engrain.cli import app
    from engrain.config import load_config
    from engrain.demo import DEMO_TRAIN_MINUTES

    ws = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "-w", str(ws), "--methods", "base,rag", "--model", str(tiny_model_dir),
                                   "--rebuild", "--json"])  # --rebuild: what a memory of an earlier recipe needs
    assert res.exit_code == 0, res.output
    config = load_config(ws / "engrain.yaml")
    assert config.synth.strategies == ["facts"] and config.ingest.chunk_tokens == 128
    assert config.train.fact_weight == 3.0 and config.synth.facts_reading == 0  # the demo's own budget settings
    assert config.train.pack_tokens == 512 and config.train.lora_plus_ratio == 4.0
    assert config.train.replay_sources == ["self_distill"]  # LoRA's prose replay answered less at the demo's budget
    assert config.train.max_minutes == DEMO_TRAIN_MINUTES  # a slow host trains fewer steps, not past the demo's time
    saved = json.loads((ws / "reports" / "acme" / "results.json").read_text())
    assert saved["n_questions"] == 149 and set(saved["methods"]) == {"base", "rag"}
    assert saved["environment"]["settings"]["latency_sample"] == 4

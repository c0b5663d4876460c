"""`engrain compare --arrivals N`: documents arrive in batches, the memory is trained on the first and updated on
each next, every earlier batch is re-asked after each step, and a rebuild on everything is the reference. Tiny
model, model-free `facts` synthesis, real ingest, real training and updates."""

from __future__ import annotations

import json

import pytest
import yaml
from bench_folder import write_bench

from engrain.errors import EngrainError
from engrain.evaluate.arrivals import check_method, question_batches, split_batches
from engrain.evaluate.bench import Question

DOCS = {
    "a-orvane": "# Orvane archive\n\nThe Orvane archive was founded by Marta Kell in 1931. Its vault opens with "
                "code 4471.\n",
    "b-selby": "# Selby lighthouse\n\nThe Selby lighthouse stands on Corran Point. Its keeper is Ivo Drent.\n",
    "c-tessel": "# Tessel mill\n\nThe Tessel mill grinds barley. Its wheel was rebuilt by Anka Rho in 1978.\n",
    "d-quarry": "# Quarry lab\n\nThe Quarry lab sits in Oskarvik and employs 38 researchers.\n",
}
QUESTIONS = [
    {"id": "q1", "type": "cloze", "question": "The Orvane archive was founded by", "answers": ["Marta Kell"],
     "docs": ["a-orvane"]},
    {"id": "q1b", "type": "cloze", "question": "The vault of the Orvane archive opens with code", "answers": ["4471"],
     "docs": ["a-orvane"]},
    {"id": "q2", "type": "cloze", "question": "The keeper of the Selby lighthouse is", "answers": ["Ivo Drent"],
     "docs": ["b-selby"]},
    {"id": "q3", "type": "qa", "question": "Who rebuilt the Tessel mill's wheel?", "answers": ["Anka Rho"],
     "docs": ["c-tessel"]},
    {"id": "q4", "type": "cloze", "question": "The Quarry lab sits in", "answers": ["Oskarvik"], "docs": ["d-quarry"]},
    {"id": "q5", "type": "qa", "question": "Who keeps the lighthouse, and where is the lab?",
     "answers": ["Ivo Drent"], "docs": ["b-selby", "d-quarry"]},
]


@pytest.fixture()
def bench_dir(tmp_path):
    return write_bench(tmp_path / "fourdocs", DOCS, QUESTIONS)


def test_batches_are_consecutive_and_even():
    files = [f"d{i}.md" for i in range(7)]
    parts = split_batches(files, 3)
    assert [len(p) for p in parts] == [3, 2, 2] and [f for p in parts for f in p] == files
    for bad in (1, 8):
        with pytest.raises(EngrainError, match="--arrivals"):
            split_batches(files, bad)


def test_a_question_belongs_to_the_latest_batch_it_needs():
    qs = [Question(id=q["id"], type=q["type"], question=q["question"], answers=q["answers"], docs=q["docs"])
          for q in QUESTIONS]
    assert question_batches(qs, [["a-orvane.md", "b-selby.md"], ["c-tessel.md", "d-quarry.md"]]) == [1, 1, 1, 2, 2, 2]


def test_an_edit_swaps_two_facts_of_an_earlier_document(bench_dir):
    from engrain.evaluate.bench import load_bench
    from engrain.evaluate.edits import plan_edits, questions_at, touched, write_docs

    bench = load_bench(bench_dir)
    batches = [["a-orvane.md", "b-selby.md"], ["c-tessel.md", "d-quarry.md"]]
    (edit,) = plan_edits(bench, batches)  # b-selby has one question: only a-orvane can change
    assert (edit.arrival, edit.doc, edit.old) == (2, "a-orvane.md", ("Marta Kell", "4471"))
    assert {q.id: q.answers for q in questions_at(bench.questions, [edit], 2)}["q1"] == ["4471"]
    assert {q.id: q.answers for q in questions_at(bench.questions, [edit], 1)}["q1"] == ["Marta Kell"]
    assert touched(bench.questions, [edit]) == {"q1", "q1b"}
    folder = bench_dir.parent / "scenario-docs"
    write_docs(bench, folder, ["a-orvane.md", "b-selby.md"], [edit], 1)
    assert (folder / "a-orvane.md").read_text() == DOCS["a-orvane"]
    write_docs(bench, folder, [f for part in batches for f in part], [edit], 2)
    text = (folder / "a-orvane.md").read_text()
    assert "founded by 4471 in 1931" in text and "opens with code Marta Kell." in text
    assert (bench_dir / "docs" / "a-orvane.md").read_text() == DOCS["a-orvane"]  # the benchmark is never written
    blob = bytes(range(256))  # a pdf or docx is copied byte for byte, never decoded
    (bench_dir / "docs" / "e-scan.pdf").write_bytes(blob)
    write_docs(bench, folder, ["e-scan.pdf"], [edit], 2)
    assert (folder / "e-scan.pdf").read_bytes() == blob


def test_the_scenario_follows_one_memory_engrain_update_can_teach():
    assert check_method(["base", "lora"]) == "lora" and check_method(["memory_layer"]) == "memory_layer"
    for methods in (["rag"], ["lora", "full"], ["lora+rag"]):
        with pytest.raises(EngrainError, match="--arrivals"):
            check_method(methods)


def test_arrivals_update_the_memory_measure_every_batch_and_resume(tmp_path, bench_dir, tiny_lm):
    from engrain.evaluate.run import run_compare
    from engrain.workspace import Workspace

    ws = Workspace.at(tmp_path / "ws").ensure()
    ws.config_path.write_text(yaml.safe_dump({
        "ingest": {"chunk_tokens": 64, "chunk_overlap": 8},
        "synth": {"strategies": ["facts"], "facts_per_chunk": 4, "facts_orders": 1},
        "train": {"lora_rank": 4, "lr": 5e-3, "seq_len": 128, "micro_batch": 1, "replay_share": 0.0, "epochs": 1.0,
                  "save_every": 0, "update_epochs": 1.0, "val_fraction": 0.0}}))
    out = tmp_path / "out"
    results = run_compare(bench_dir, ws, ["lora"], out, tiny_lm, latency_sample=0, max_new_tokens=4, arrivals=2)
    scenario = results["arrivals"]
    assert scenario["batches"] == [["a-orvane.md", "b-selby.md"], ["c-tessel.md", "d-quarry.md"]]
    first, second = scenario["steps"]
    # q1 and q1b change at arrival 2 (a-orvane edited), so they stay out of batch 1's retention throughout.
    assert set(first["by_batch"]) == {"1"} and first["by_batch"]["1"]["n"] == 1
    assert set(second["by_batch"]) == {"1", "2"} and second["by_batch"]["2"]["n"] == 3
    assert first["changed_facts"]["n"] == 0 and second["changed_facts"]["n"] == 2
    assert 0 <= second["changed_facts"]["new_value"] <= 1 and scenario["edits"][0]["doc"] == "a-orvane.md"
    from engrain.corpus.schema import read_documents

    assert "founded by 4471" in {d.id: d.text for d in read_documents(ws)}["a-orvane"]  # the memory saw the edit
    assert results["examples"][0]["id"] == "q1" and results["examples"][0]["answers"] == ["4471"]  # scored as edited
    assert first["train_tokens"] > 0 and second["train_tokens"] > 0 and second["seconds"] > 0
    assert "general_qa_delta" in second["forgetting"] and second["forgetting"]["perplexity_ratio"] > 0
    # The updated memory learned every document; the rebuild is a separate memory trained once on all of them.
    learned = json.loads((ws.memory_dir("lora-arrivals") / "engrain_memory.json").read_text())["learned_documents"]
    assert sorted(learned) == sorted(DOCS)
    assert scenario["rebuild"]["steps"] > 0 and 0 <= scenario["rebuild"]["contains"] <= 1
    assert scenario["updated_vs_rebuild"]["n"] == len(QUESTIONS)
    assert {"batch1_retention", "all_vs_rebuild", "update_cost_vs_first_training",
            "changed_facts_new_value"} <= set(scenario["measures"])
    # The usual tables hold the updated memory on every question.
    assert results["methods"]["lora"]["n"] == len(QUESTIONS) and results["methods"]["lora"]["forgetting"]
    assert results["environment"]["settings"]["arrivals"] == 2
    assert "## Arrivals" in (out / "report.md").read_text() and (out / "retention.png").is_file()
    # A rerun keeps the recorded steps: nothing is trained again.
    adapter = ws.memory_dir("lora-arrivals") / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    again = run_compare(bench_dir, ws, ["lora"], tmp_path / "out2", tiny_lm, latency_sample=0, max_new_tokens=4,
                        arrivals=2)
    assert adapter.stat().st_mtime_ns == before
    assert [s["by_batch"] for s in again["arrivals"]["steps"]] == [s["by_batch"] for s in scenario["steps"]]
    # A crash after the update trained but before its step was recorded: the rerun measures the step again and
    # still counts the training the crashed process did in the step's cost.
    state_path = next((ws.root / "arrivals").glob("*.json"))
    state = json.loads(state_path.read_text())
    del state["steps"][1], state["rebuild"]
    state_path.write_text(json.dumps(state))
    redone = run_compare(bench_dir, ws, ["lora"], tmp_path / "out4", tiny_lm, latency_sample=0, max_new_tokens=4,
                         arrivals=2)
    assert adapter.stat().st_mtime_ns == before
    step = redone["arrivals"]["steps"][1]
    assert step["train_seconds"] == second["train_seconds"] and step["seconds"] >= step["train_seconds"] > 0
    # Other batches are another scenario: refused, unless started over.
    with pytest.raises(EngrainError, match="other batches"):
        run_compare(bench_dir, ws, ["lora"], tmp_path / "out3", tiny_lm, latency_sample=0, arrivals=4)

"""The relevance gate: a trained memory answers questions about its documents, the base weights the rest, with a
threshold calibrated on training data only and cached under the documents the memory learned. Tiny model, real
embedding model, real ingest, synthesis and training."""

from __future__ import annotations

import threading

import numpy as np
import yaml

from engrain.memory.gate import GATE_FILE, RelevanceGate, threshold_for

ABOUT = "Who founded the Orvane archive?"
GENERAL = "What is the capital of France?"


def test_threshold_lets_through_the_general_share_and_refuses_few_training_questions():
    general = np.linspace(0.0, 0.4, 101)  # 0.00, 0.004, ..., 0.40
    items = np.linspace(0.5, 0.9, 101)
    assert threshold_for(items, general, 0.05) == np.quantile(general, 0.95)
    # Training questions below that line: the line moves down so that at most 2% of them are refused.
    low_items = np.linspace(0.1, 0.9, 101)
    t = threshold_for(low_items, general, 0.05)
    assert t == np.quantile(low_items, 0.02) and (low_items < t).mean() <= 0.02
    assert threshold_for(np.array([]), general, 0.05) == np.quantile(general, 0.95)


def test_a_question_scores_its_margin_over_the_nearest_general_request():
    unit = np.eye(4, dtype=np.float32)
    gate = RelevanceGate("none", chunks=unit[:1], general=unit[1:3], threshold=0.0)
    about = np.array([[0.8, 0.6, 0.0, 0.0]], dtype=np.float32)  # near the chunk, less near a general request
    topical = np.array([[0.6, 0.8, 0.0, 0.0]], dtype=np.float32)  # near the chunk, nearer a general request
    assert np.allclose(gate.margins(about), [0.2]) and np.allclose(gate.margins(topical), [-0.2])
    # Calibrating on the general requests themselves compares each with the others, never with itself.
    assert np.allclose(gate.margins(unit[1:3], leave_out_general=True), [0.0, 0.0])
    assert np.allclose(gate.margins(unit[1:3]), [-1.0, -1.0])
    # No general requests: the similarity to the documents alone.
    assert np.allclose(RelevanceGate("none", unit[:1], np.zeros((0, 4)), 0.0).margins(topical), [0.6])


def test_the_gate_routes_answers_and_is_cached_per_learned_documents(tmp_path, tokenizer, tiny_model_dir, tiny_lm,
                                                                     monkeypatch):
    from test_update import GAMMA, reingest, make_ws, run_update, trained

    from engrain.memory import gate as gate_module
    from engrain.memory.base import ClosedBook
    from engrain.memory.registry import open_memory

    ws, docs = make_ws(tmp_path, tokenizer)
    trained(ws, tiny_model_dir)
    memory = open_memory("lora", ws, tiny_lm)
    assert memory.gate is not None and (ws.memory_dir("lora") / GATE_FILE).is_file()
    calibration = memory.describe()["gate"]
    assert calibration["general_requests_admitted"] <= 0.05 + 1 / 500 and calibration["training_questions_refused"] <= 0.02
    assert memory.gate.routes([ABOUT, GENERAL]) == [True, False]

    answers = memory.answer([ABOUT, GENERAL], max_new_tokens=8)
    assert [a.meta["weights"] for a in answers] == ["lora", "base"]
    # The general question is answered by the base weights exactly as the base model answers it.
    assert answers[1].text == ClosedBook(tiny_lm).answer([GENERAL], max_new_tokens=8)[0].text
    completed = memory.complete(["The Orvane archive was founded by", "The capital of France is"], max_new_tokens=4)
    assert [a.meta["weights"] for a in completed] == ["lora", "base"]

    # The hybrid takes the memory's gate: a refused question is answered closed-book, with no chunk in its prompt.
    from engrain.rag.index import build_index

    build_index(ws)
    hybrid = open_memory("lora+rag", ws, tiny_lm).answer([ABOUT, GENERAL], max_new_tokens=4)
    assert [a.meta["weights"] for a in hybrid] == ["lora+rag", "base"]
    assert hybrid[0].chunks and not hybrid[1].chunks

    # The server routes the same way, and says which weights answered.
    served = _served(ws, tiny_model_dir, "lora", [ABOUT, GENERAL])
    assert [e["weights"] for e in served] == ["lora", "base"]
    served = _served(ws, tiny_model_dir, "lora+rag", [ABOUT, GENERAL])
    assert [e["weights"] for e in served] == ["lora", "base"] and served[0]["chunks"] and not served[1]["chunks"]

    # Opened again, the gate comes from its cache: nothing is embedded for the chunks or calibrated.
    monkeypatch.setattr(gate_module, "_build", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    assert open_memory("lora", ws, tiny_lm).gate.threshold == memory.gate.threshold
    monkeypatch.undo()

    # A document learned by an update is part of the gate: its chunks are added.
    (docs / "gamma.md").write_text(GAMMA)
    reingest(ws, docs, tokenizer)
    run_update(ws, tiny_model_dir)
    updated = open_memory("lora", ws, tiny_lm)
    assert len(updated.gate.chunks) > len(memory.gate.chunks)
    assert updated.gate.routes(["Who rebuilt the wheel of the Tessel mill?"]) == [True]


def test_with_the_gate_off_the_trained_weights_answer_everything(tmp_path, tokenizer, tiny_model_dir, tiny_lm):
    from test_update import make_ws, trained

    from engrain.memory.registry import open_memory

    ws, _ = make_ws(tmp_path, tokenizer)
    trained(ws, tiny_model_dir)
    config = yaml.safe_load(ws.config_path.read_text())
    ws.config_path.write_text(yaml.safe_dump({**config, "answer": {"gate": False}}))
    memory = open_memory("lora", ws, tiny_lm)
    assert memory.gate is None and memory.describe()["gate"] is None
    assert "weights" not in memory.answer([GENERAL], max_new_tokens=4)[0].meta


def _served(ws, model_dir, memory: str, questions: list[str]) -> list[dict]:
    """Ask ``engrain serve``'s ``memory`` each question over HTTP; each answer's ``engrain`` object."""
    import httpx
    from serve_workspace import ThreadServer

    from engrain.serve.app import build, create_app

    engine, scheduler = build(ws.root, str(model_dir), device="cpu")
    gate, ran_on = engine.gates["lora"], []

    def routes(questions: list[str]) -> list[bool]:
        ran_on.append(threading.current_thread())
        return type(gate).routes(gate, questions)

    gate.routes = routes
    out = []
    with ThreadServer(create_app(engine, scheduler, max_tokens_limit=16)) as srv:
        for question in questions:
            r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=60,
                           json={"model": f"{ws.root.name}:{memory}", "max_tokens": 4,
                                 "messages": [{"role": "user", "content": question}]})
            assert r.status_code == 200, r.text
            out.append(r.json()["engrain"])
    # the gate's embedding ran on threads that ended with it, none of the server's own (passing_thread.py)
    assert len(ran_on) == len(questions) and not any(t.is_alive() for t in ran_on)
    return out

"""Cloze probes asked as raw continuation (``Memory.complete``) for every method, and `engrain compare`'s
``probe_form``: which call each question goes through, what is recorded, and a bad value."""

from __future__ import annotations

import json

import pytest

from engrain import models
from engrain.models import generation
from engrain.config import RagConfig
from engrain.errors import EngrainError
from engrain.evaluate.bench import Question
from engrain.evaluate.compare import ask, cloze_text, run_method
from engrain.rag.index import build_index
from engrain.memory.base import Answer, ClosedBook
from engrain.memory.context import ContextMemory
from engrain.memory.rag import RagMemory
from engrain.models import Generation, continuation_prompt, first_line, generate
from test_context import make_ws as make_context_ws
from test_rag import make_ws as make_rag_ws

CHAT_MARKERS = ("<|im_start|>", "<|im_end|>", models.DEFAULT_SYSTEM, "Question:")
STARTS = ["The Varn lighthouse was first lit in", "The pier of Tessly harbour is",
          "Today the Corran mill is a museum with"]


def spy_on(monkeypatch, module, name: str = "generate", text: str | None = None) -> list[list[str]]:
    """Record the prompts ``module.<name>`` is called with; answer ``text`` instead of generating when given."""
    calls: list[list[str]] = []
    real = getattr(module, name)

    def spy(lm, prompts, **kwargs):
        calls.append(list(prompts))
        if text is None:
            return real(lm, prompts, **kwargs)
        return [Generation(text, len(p), 5, "length") for p in prompts]

    monkeypatch.setattr(module, name, spy)
    return calls


# --------------------------------------------------------------------------------------------------
# The cut and the closed-book form
# --------------------------------------------------------------------------------------------------


def test_a_continuation_is_cut_at_its_first_newline():
    assert first_line("Oskarvik, by the sea.\n\nChapter two begins") == "Oskarvik, by the sea."
    assert first_line("  in 1874 \n") == "in 1874"
    assert first_line("no newline at all") == "no newline at all"
    assert continuation_prompt("The start", "Some text.") == "Some text.\n\nThe start"
    assert continuation_prompt("The start") == "The start"


def test_closed_book_complete_sends_the_raw_start_and_cuts_the_newline(tiny_lm, monkeypatch):
    calls = spy_on(monkeypatch, generation, text="Oskarvik, by the sea.\n\nChapter two")
    ans = ClosedBook(tiny_lm).complete(["The Quarry lab sits in"], max_new_tokens=4)[0]
    assert calls == [["The Quarry lab sits in"]]  # no chat template, no system message
    assert ans.text == "Oskarvik, by the sea." and ans.completion_tokens == 5


def test_closed_book_complete_equals_generate_on_the_raw_start(tiny_lm):
    got = ClosedBook(tiny_lm, batch_size=2).complete(STARTS, max_new_tokens=8)
    want = generate(tiny_lm, STARTS, max_new_tokens=8)
    assert [a.text for a in got] == [first_line(g.text) for g in want]
    tok = tiny_lm.tokenizer
    assert [a.prompt_tokens for a in got] == [len(tok(s, add_special_tokens=False)["input_ids"]) for s in STARTS]
    with pytest.raises(EngrainError, match="empty"):
        ClosedBook(tiny_lm).complete(["  "], max_new_tokens=4)


@pytest.mark.slow
def test_real_model_continues_the_start_up_to_the_newline(embedded_lm):
    start = "The capital of France is"
    got = ClosedBook(embedded_lm).complete([start], max_new_tokens=12)[0]
    want = generate(embedded_lm, [start], max_new_tokens=12)[0]
    assert got.text == first_line(want.text) and "Paris" in got.text and "\n" not in got.text
    # decoding stopped at the line break instead of writing the paragraphs the cut throws away
    assert "\n" in want.text and got.completion_tokens < want.completion_tokens


# --------------------------------------------------------------------------------------------------
# rag and context
# --------------------------------------------------------------------------------------------------


@pytest.fixture()
def rag_ws(tmp_path, tokenizer):
    ws = make_rag_ws(tmp_path, tokenizer)
    build_index(ws)
    return ws


def test_rag_complete_puts_plain_chunk_texts_before_the_start(rag_ws, tiny_lm, monkeypatch):
    from engrain.memory import rag

    mem = RagMemory(rag_ws, tiny_lm, RagConfig(top_k=2))
    calls = spy_on(monkeypatch, rag)
    answers = mem.complete(STARTS[:2], max_new_tokens=6)
    hits = mem.retriever.retrieve(STARTS[:2], 2)  # the start is the query
    for start, prompt, ans, kept in zip(STARTS, calls[0], answers, hits):
        assert prompt == "\n\n".join(h.text.strip() for h in kept) + "\n\n" + start
        assert not any(marker in prompt for marker in CHAT_MARKERS)
        assert not any(f"[{h.chunk_id}]" in prompt for h in kept)  # no chunk-id labels in raw text
        assert ans.chunks == [h.chunk_id for h in kept] and "\n" not in ans.text and ans.completion_tokens > 0
        assert ans.meta["retrieval_ms"] >= 0 and "chunks_dropped" not in ans.meta
    assert answers[0].meta["docs"][0] == "lighthouse" and answers[1].meta["docs"][0] == "harbour"


def test_rag_complete_fits_the_window_like_answer(rag_ws, tiny_lm):
    mem = RagMemory(rag_ws, tiny_lm, RagConfig(top_k=4))
    long_start = "The lighthouse keeper wrote that " + "lighthouse " * 1990
    ans = mem.complete([long_start], max_new_tokens=8)[0]
    assert ans.meta["chunks_dropped"] and len(ans.chunks) + len(ans.meta["chunks_dropped"]) == 4
    assert ans.prompt_tokens + 8 <= tiny_lm.max_context
    with pytest.raises(EngrainError, match="sentence start .* does not fit the model's window"):
        mem.complete(["lighthouse " * 2100], max_new_tokens=8)


def test_context_complete_is_the_plain_documents_then_the_start(tmp_path, tokenizer, tiny_lm):
    mem = ContextMemory(make_context_ws(tmp_path, tokenizer), tiny_lm)
    raw = mem._in_form("continuation")
    assert raw is mem._in_form("continuation") and mem._in_form("chat") is mem  # made once, on first use
    assert not any(marker in raw.prefix_text for marker in CHAT_MARKERS) and "[a-lighthouse]" not in raw.prefix_text
    assert raw.context.index("The Varn lighthouse") < raw.context.index("The harbour") < raw.context.index("Corran")
    # The cached prefix and the start's tokens are exactly the whole plain prompt's tokens.
    whole = continuation_prompt(STARTS[0], raw.context)
    assert raw.prefix_ids + raw.question_ids(STARTS[0]) == tokenizer(whole, add_special_tokens=False)["input_ids"]
    ans = mem.complete(STARTS[:1], max_new_tokens=6)[0]
    assert "\n" not in ans.text and ans.meta["truncated"] is False and ans.meta["prefix_reused"] is True


def test_context_complete_reusing_the_prefix_gives_the_same_greedy_text(tmp_path, tokenizer, tiny_lm):
    ws = make_context_ws(tmp_path, tokenizer)
    reused = ContextMemory(ws, tiny_lm, batch_size=2).complete(STARTS, max_new_tokens=12)
    fresh = ContextMemory(ws, tiny_lm, batch_size=1, reuse_prefix=False).complete(STARTS, max_new_tokens=12)
    assert [a.text for a in reused] == [a.text for a in fresh]
    assert [a.prompt_tokens for a in reused] == [a.prompt_tokens for a in fresh]
    assert all(a.completion_tokens > 0 for a in reused)


# --------------------------------------------------------------------------------------------------
# compare: which call each question goes through, and what is recorded
# --------------------------------------------------------------------------------------------------


class RecordingMemory:
    """A Memory that answers with what it was asked, and records each call."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def answer(self, questions: list[str], max_new_tokens: int = 48) -> list[Answer]:
        self.calls.append(("answer", list(questions)))
        return [Answer(f"answer: {q}", 1.0, 1) for q in questions]

    def complete(self, starts: list[str], max_new_tokens: int = 32) -> list[Answer]:
        self.calls.append(("complete", list(starts)))
        return [Answer(f"complete: {s}", 1.0, 1) for s in starts]

    def describe(self) -> dict:
        return {"memory": self.name}


MIXED = [Question(id="c1", type="cloze", question="The Quarry lab sits in", answers=["Oskarvik"], docs=[]),
         Question(id="q1", type="qa", question="Who started Veltrix?", answers=["Mara Olsen"], docs=[]),
         Question(id="c2", type="cloze", question="The Lumen router weighs", answers=["740 grams"], docs=[])]


def test_continuation_sends_cloze_to_complete_and_qa_to_answer_in_question_order():
    mem = RecordingMemory()
    run = run_method("recording", mem, MIXED, latency_sample=2, max_new_tokens=4)
    assert [a.text for a in run.answers] == ["complete: The Quarry lab sits in", "answer: Who started Veltrix?",
                                             "complete: The Lumen router weighs"]
    assert mem.calls[:2] == [("complete", ["The Quarry lab sits in", "The Lumen router weighs"]),
                             ("answer", ["Who started Veltrix?"])]
    # The latency sample times the call each question uses, one question at a time.
    assert mem.calls[2:] == [("complete", ["The Quarry lab sits in"]), ("answer", ["Who started Veltrix?"])]
    assert len(run.latencies_ms) == 2


def test_chat_form_asks_cloze_as_an_instruction_through_answer():
    mem = RecordingMemory()
    answers = ask(mem, MIXED, probe_form="chat", max_new_tokens=4)
    assert mem.calls == [("answer", [cloze_text("The Quarry lab sits in"), "Who started Veltrix?",
                                     cloze_text("The Lumen router weighs")])]
    assert answers[0].text == "answer: " + cloze_text("The Quarry lab sits in")


def test_unknown_probe_form_is_a_clear_error(tmp_path, tiny_lm):
    from engrain.evaluate.run import run_compare
    from engrain.workspace import Workspace

    with pytest.raises(EngrainError, match="Unknown probe form 'raw'") as err:
        run_method("recording", RecordingMemory(), MIXED, probe_form="raw")
    assert "continuation" in err.value.hint and "chat" in err.value.hint
    with pytest.raises(EngrainError, match="Unknown probe form"):
        run_compare(tmp_path / "no-bench", Workspace.at(tmp_path / "ws"), ["base"], tmp_path / "out", tiny_lm,
                    probe_form="Chat")


def test_compare_records_the_probe_form(tmp_path, tiny_lm):
    from engrain.evaluate.run import run_compare
    from engrain.workspace import Workspace

    bench = tmp_path / "bench"
    (bench / "docs").mkdir(parents=True)
    (bench / "docs" / "quarry.md").write_text("# Quarry lab\n\nThe Quarry lab sits in Oskarvik.\n")
    rows = [{"id": "c1", "type": "cloze", "question": "The Quarry lab sits in", "answers": ["Oskarvik"],
             "docs": ["quarry"], "hops": 1, "tags": []},
            {"id": "q1", "type": "qa", "question": "Where is the Quarry lab?", "answers": ["Oskarvik"],
             "docs": ["quarry"], "hops": 1, "tags": []}]
    (bench / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    for form in ("continuation", "chat"):
        run_compare(bench, Workspace.at(tmp_path / "ws").ensure(), ["base"], out, tiny_lm, latency_sample=1,
                    max_new_tokens=4, probe_form=form)
        saved = json.loads((out / "results.json").read_text())
        assert saved["probe_form"] == form and saved["environment"]["settings"]["probe_form"] == form
        assert f"Cloze probes asked as {form}" in (out / "report.md").read_text()
    assert "Cloze probes asked as chat" in (out / "report.html").read_text()

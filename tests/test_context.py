"""The `context` memory: document order, truncation policy, KV-prefix reuse equal to recomputing, bad input."""

from __future__ import annotations

import json

import pytest

from engrain.config import IngestConfig
from engrain.corpus.ingest import ingest
from engrain.errors import EngrainError
from engrain.memory.context import ContextMemory
from engrain.models import chat_messages, chat_prompt
from engrain.workspace import Workspace

DOCS = {
    "b-harbour": "The harbour of Tessly was dredged in 1931. Its pier is 212 metres long. Ferries leave at dawn.",
    "a-lighthouse": "The Varn lighthouse stands on a granite spit. It was lit for the first time in 1874. "
                    "Its keeper, Oda Brisk, kept a logbook for forty years.",
    "c-mill": "The Corran mill ground oats until 1958. The river Sele turns its wheel. "
              "Today the mill is a museum with a tea room.",
}
QUESTIONS = ["When was the Varn lighthouse first lit?", "How long is the pier?",
             "What turns the wheel of the Corran mill, and what is the mill today?", "Who kept the logbook?"]


def make_ws(tmp_path, tokenizer, docs=DOCS) -> Workspace:
    src = tmp_path / "docs"
    src.mkdir(exist_ok=True)
    for doc_id, text in docs.items():
        (src / f"{doc_id}.txt").write_text(text, encoding="utf-8")
    ws = Workspace.at(tmp_path / "ws")
    ingest(src, ws, IngestConfig(chunk_tokens=64, chunk_overlap=8), tokenizer=tokenizer)
    return ws


def test_documents_in_id_order_and_one_chat_template(tmp_path, tokenizer, tiny_lm):
    mem = ContextMemory(make_ws(tmp_path, tokenizer), tiny_lm)
    order = [mem.context.find(f"[{d}]") for d in sorted(DOCS)]
    assert all(p >= 0 for p in order) and order == sorted(order)
    for q in QUESTIONS:
        # The cached prefix + the question part are exactly the single chat template's rendering.
        full = chat_prompt(tiny_lm.tokenizer, chat_messages(q, mem.context))
        assert mem.prefix_text + mem.suffix_template.replace("\x00QUESTION\x00", q) == full
    assert mem.truncation == {"truncated": False, "documents": 3, "context_tokens": len(mem.prefix_ids)}


def test_prefix_reuse_gives_the_same_greedy_answers_as_recomputing(tmp_path, tokenizer, tiny_lm):
    ws = make_ws(tmp_path, tokenizer)
    # batch_size 3 over 4 questions of different lengths: padded batches and a batch of one, both reuse the cache.
    reused = ContextMemory(ws, tiny_lm, batch_size=3).answer(QUESTIONS, max_new_tokens=12)
    fresh = ContextMemory(ws, tiny_lm, batch_size=1, reuse_prefix=False).answer(QUESTIONS, max_new_tokens=12)
    assert [a.text for a in reused] == [a.text for a in fresh]
    assert all(a.completion_tokens > 0 for a in reused)
    assert [a.prompt_tokens for a in reused] == [a.prompt_tokens for a in fresh]
    assert reused[0].meta["prefix_reused"] is True and fresh[0].meta["prefix_reused"] is False


@pytest.mark.parametrize("batch", [2, 4])
def test_shared_prefix_fast_loop_matches_generate_from_the_cache(tmp_path, tokenizer, tiny_lm, monkeypatch, batch):
    """The fast loop (prefix read once per step for the whole batch; at batch 2, finished rows replaced by waiting
    questions) and generate() over a per-row copy of the prefix cache decode the same greedy tokens."""
    from engrain.models import fastgen

    ws = make_ws(tmp_path, tokenizer)
    assert fastgen.supports(tiny_lm.model)
    fast = ContextMemory(ws, tiny_lm, batch_size=batch).answer(QUESTIONS, max_new_tokens=12)
    monkeypatch.setenv("ENGRAIN_FASTGEN", "0")
    plain = ContextMemory(ws, tiny_lm, batch_size=batch).answer(QUESTIONS, max_new_tokens=12)
    assert [a.text for a in fast] == [a.text for a in plain]
    assert [a.completion_tokens for a in fast] == [a.completion_tokens for a in plain]


def test_reuse_matches_a_plain_forward_pass_logits(tmp_path, tokenizer, tiny_lm):
    """The cached prefix + question gives the same next-token distribution as the whole prompt at once."""
    import torch

    mem = ContextMemory(make_ws(tmp_path, tokenizer), tiny_lm)
    suffix = mem.question_ids(QUESTIONS[0])
    with torch.inference_mode():
        whole = tiny_lm.model(input_ids=torch.tensor([mem.prefix_ids + suffix])).logits[0, -1]
        cached = tiny_lm.model(input_ids=torch.tensor([suffix]), cache=mem.batch_cache(1), use_cache=True).logits[0, -1]
    assert torch.allclose(whole, cached, atol=1e-4)
    # The shared cache is a view: answering must not have grown it.
    assert mem.prefix_cache().get_seq_length() == len(mem.prefix_ids)


def test_truncation_keeps_whole_documents_then_cuts_at_a_sentence(tmp_path, tokenizer, tiny_lm):
    long_docs = {f"doc-{i:02d}": " ".join(f"Fact {i}.{j}: the stone number {j} of row {i} is grey." for j in range(12))
                 for i in range(6)}
    ws = make_ws(tmp_path, tokenizer, long_docs)
    mem = ContextMemory(ws, tiny_lm, max_context=700, answer_budget=16, question_budget=48)
    t = mem.truncation
    assert t["truncated"] is True
    assert t["context_tokens"] <= 700 - 16 - 48
    assert t["documents_dropped"] and t["documents_dropped"] == sorted(t["documents_dropped"])
    kept = [d for d in sorted(long_docs) if d not in t["documents_dropped"]]
    assert kept and kept == sorted(long_docs)[:len(kept)]  # a prefix of the id order
    for doc_id in kept[:-1] if t["documents_cut"] else kept:
        assert long_docs[doc_id] in mem.context  # whole documents stay whole
    if t["documents_cut"]:
        assert t["documents_cut"] == [kept[-1]] and mem.context.rstrip().endswith(".")
    ans = mem.answer(["Which stone is grey?"], max_new_tokens=8)[0]
    assert ans.meta["truncated"] is True and ans.meta["documents_dropped"] == t["documents_dropped"]
    assert ans.to_dict()["context_tokens"] == t["context_tokens"]


def test_removed_documents_are_left_out(tmp_path, tokenizer, tiny_lm):
    ws = make_ws(tmp_path, tokenizer)
    (tmp_path / "docs" / "c-mill.txt").unlink()
    ingest(tmp_path / "docs", ws, IngestConfig(chunk_tokens=64, chunk_overlap=8), tokenizer=tokenizer)
    mem = ContextMemory(ws, tiny_lm)
    assert "[c-mill]" not in mem.context and "[a-lighthouse]" in mem.context


def test_overlong_question_is_refused(tmp_path, tokenizer, tiny_lm):
    mem = ContextMemory(make_ws(tmp_path, tokenizer), tiny_lm, max_context=400, question_budget=32)
    with pytest.raises(EngrainError, match="over the model's window"):
        mem.answer(["Why " * 400 + "?"], max_new_tokens=8)


def test_no_corpus_is_a_clear_error(tmp_path, tiny_lm):
    with pytest.raises(EngrainError, match="engrain ingest"):
        ContextMemory(Workspace.at(tmp_path / "empty"), tiny_lm)


def test_cli_ask_with_context_memory(tmp_path, tokenizer, tiny_model_dir):
    from typer.testing import CliRunner

    from engrain.cli import app

    ws = make_ws(tmp_path, tokenizer)
    res = CliRunner().invoke(app, ["ask", QUESTIONS[0], "-w", str(ws.root), "--memory", "context",
                                   "--model", str(tiny_model_dir), "--max-tokens", "6", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["memory"] == "context" and out["truncated"] is False and out["prompt_tokens"] > out["context_tokens"]

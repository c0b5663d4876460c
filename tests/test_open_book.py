"""Open-book training items (``synth.facts_reading``): a fact continued and asked with its chunk and a similar chunk
in the prompt, rendered for training exactly as ``rag`` shows retrieved chunks."""

from __future__ import annotations

import json

import pytest
from synth_workspace import read_jsonl, write_corpus

from engrain.config import SynthConfig
from engrain.errors import EngrainError
from engrain.models import DEFAULT_SYSTEM, chat_messages, chat_prompt, continuation_prompt, plain_chunks, render_chunks
from engrain.synth.run import run_synth
from engrain.train.data import IGNORE, encode_item, read_synthetic, split_examples
from engrain.workspace import Workspace


def _run(tmp_path, name: str, reading: int) -> list[dict]:
    ws = Workspace.at(write_corpus(tmp_path / name))
    run_synth(ws, SynthConfig(strategies=["facts"], facts_reading=reading), show_progress=False)
    return read_jsonl(ws.synth_dir / "facts.jsonl")


def test_open_book_items_show_their_chunk_beside_a_similar_one(tmp_path):
    closed = _run(tmp_path, "closed", 0)
    items = _run(tmp_path, "open", 1)
    assert not any("context" in it for it in closed)
    opened = [it for it in items if "context" in it]
    by_chunk: dict[str, list[dict]] = {}
    for it in opened:
        by_chunk.setdefault(it["chunk_ids"][0], []).append(it)
    assert by_chunk, "chunks with a wh-question get open-book items"
    for chunk_id, pair in by_chunk.items():
        assert sorted(it["variant"][0] for it in pair) == ["a", "b"]  # one continued statement, one question
        a = next(it for it in pair if it["variant"][0] == "a")
        b = next(it for it in pair if it["variant"][0] == "b")
        assert a["variant"][1:] == b["variant"][1:] and a["context"] == b["context"]
        shown = [c["chunk_id"] for c in a["context"]]
        assert chunk_id in shown and len(shown) == 2 and len(set(shown)) == 2
        # The same fact closed-book is still there: open-book items come beside it, not instead.
        i = a["variant"][1:]
        assert any(it["variant"] == f"s{i}" and it["text"] == b["text"] for it in closed)
        assert any(it["variant"] == f"h{i}.0" and it["messages"] == a["messages"] for it in closed)
        assert a["chunk_ids"] == [chunk_id]  # the neighbour is shown, not learned
    assert len(items) == len(closed) + len(opened)


def test_open_book_items_train_on_rags_prompt(tmp_path, tokenizer):
    items = _run(tmp_path, "ws", 1)
    a = next(it for it in items if it.get("context") and "messages" in it)
    b = next(it for it in items if it.get("context") and "text" in it)
    shown = [(c["chunk_id"], c["text"]) for c in a["context"]]
    question, answer = a["messages"][0]["content"], a["messages"][1]["content"]
    rag_prompt = chat_prompt(tokenizer, chat_messages(question, render_chunks(shown), DEFAULT_SYSTEM))
    ex = encode_item(tokenizer, a, "a")
    n_prompt = len(tokenizer(rag_prompt, add_special_tokens=False)["input_ids"])
    assert ex.ids[:n_prompt] == tokenizer(rag_prompt, add_special_tokens=False)["input_ids"]
    assert all(x == IGNORE for x in ex.labels[:n_prompt]) and answer.split()[0] in tokenizer.decode(ex.ids[n_prompt:])
    # The text item continues after the chunks' plain texts, with no loss on them.
    prefix = continuation_prompt("", plain_chunks([c["text"] for c in b["context"]]))
    ex = encode_item(tokenizer, b, "b")
    n_prefix = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    assert tokenizer.decode(ex.ids[:n_prefix]) == prefix
    assert all(x == IGNORE for x in ex.labels[:n_prefix]) and all(x != IGNORE for x in ex.labels[n_prefix:])
    assert tokenizer.decode(ex.ids[n_prefix:]).startswith(b["text"])


def test_a_held_out_fact_is_not_asked_open_book_either(tmp_path, tokenizer):
    items = [(it["id"], it) for it in _run(tmp_path, "ws", 2)]
    examples = [encode_item(tokenizer, item, key) for key, item in items]
    train, val = split_examples(examples, dict(items), fraction=0.5, max_val=1000)
    assert val and not any(dict(items)[e.key].get("context") for e in val)
    trained = {e.key for e in train}
    facts_held = {(dict(items)[e.key]["chunk_sha256"][0], dict(items)[e.key]["variant"][1:].split(".")[0])
                  for e in val}
    for key, item in items:
        if item.get("context") and item["variant"][0] == "a":
            fact = (item["chunk_sha256"][0], item["variant"][1:])
            assert (key in trained) != (fact in facts_held), item["variant"]


def test_a_bad_context_names_the_line(tmp_path):
    ws = Workspace.at(tmp_path / "ws")
    ws.synth_dir.mkdir(parents=True)
    good = {"text": "The Orvik Observatory is on Mount Tessel.", "context": [{"chunk_id": "a#0", "text": "x"}]}
    bad = {"text": "The Kell Telescope was built in 1960.", "context": ["a#0"]}
    (ws.synth_dir / "mine.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(EngrainError, match=r"mine\.jsonl:2: 'context'"):
        read_synthetic(ws)

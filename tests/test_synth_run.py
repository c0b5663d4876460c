"""The synthesis runner with a real (tiny) local model: formats, rejection accounting, coverage, re-ingested
corpora, dry runs, and the fast decode loop's equality with ``generate()``."""

from __future__ import annotations

import json

import pytest
from synth_workspace import read_jsonl, sha, write_corpus

from engrain.clients.local import LocalGenerator
from engrain.config import SynthConfig
from engrain.synth.run import run_synth
from engrain.synth.store import read_items
from engrain.workspace import Workspace

MODEL_STRATEGIES = ["rephrase", "qa", "entities", "implications"]


def test_model_strategies_with_a_tiny_model_are_filtered_and_reported(tmp_path, tiny_lm):
    ws = Workspace.at(write_corpus(tmp_path / "ws"))
    gen = LocalGenerator(tiny_lm, batch_size=16)
    cfg = SynthConfig(strategies=MODEL_STRATEGIES, per_chunk=1, max_rounds=1)
    summary = run_synth(ws, cfg, generator=gen, show_progress=False)
    n_chunks = summary["chunks"]
    for name in MODEL_STRATEGIES:
        rep = summary["strategies"][name]
        assert rep["chunks_run"] == n_chunks
        # A random model writes noise: the filters reject it and say why; chunks are reported under-covered.
        assert rep["generated"] > 0
        assert rep["accepted"] + sum(rep["rejected"].values()) == rep["generated"]
        assert rep["under_covered_count"] == n_chunks - rep["accepted"]
        progress = read_jsonl(ws.synth_dir / "progress" / f"{name}.jsonl")
        assert len(progress) == n_chunks
    assert summary["usage"]["completion_tokens"] > 0
    assert summary["generator"] == f"local:{tiny_lm.name}"


def test_grounding_off_keeps_model_items_with_provenance(tmp_path, tiny_lm):
    ws = Workspace.at(write_corpus(tmp_path / "ws"))
    gen = LocalGenerator(tiny_lm, batch_size=16)
    cfg = SynthConfig(strategies=["rephrase", "entities"], per_chunk=2, max_rounds=1, grounding="off", seed=7)
    summary = run_synth(ws, cfg, generator=gen, show_progress=False)
    items = read_jsonl(ws.synth_dir / "rephrase.jsonl")
    assert len(items) == summary["strategies"]["rephrase"]["accepted"] > 0
    it = items[0]
    assert it["generator"] == f"local:{tiny_lm.name}" and it["seed"] == 7 and it["strategy"] == "rephrase"
    assert isinstance(it["text"], str) and it["chunk_sha256"][0] in {json.loads(line)["sha256"] for line in
                                                                      ws.chunks_path.read_text().splitlines()}
    # Entity items can span documents: provenance lists every chunk and document involved.
    ent = read_jsonl(ws.synth_dir / "entities.jsonl")
    assert ent and any(len(e["doc_ids"]) == 2 for e in ent), "expected a cross-document entity item"


def test_only_new_or_changed_chunks_are_synthesised(tmp_path):
    ws = Workspace.at(write_corpus(tmp_path / "ws"))
    first = run_synth(ws, SynthConfig(strategies=["facts"]), show_progress=False)["strategies"]["facts"]
    assert first["chunks_run"] == first["chunks"]
    # Re-ingest with one chunk edited and one added.
    rows = read_jsonl(ws.chunks_path)
    rows[0]["text"] = rows[0]["text"].replace("1962", "1963")
    rows[0]["sha256"] = sha(rows[0]["text"])
    new = "The Tessel Ferry crosses Lake Orm twice a day since 1999. It was built by the Dunmore Works."
    rows.append({**rows[-1], "id": "new#0", "doc_id": "new", "text": new, "sha256": sha(new)})
    ws.chunks_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    second = run_synth(ws, SynthConfig(strategies=["facts"]), show_progress=False)["strategies"]["facts"]
    assert second["chunks_run"] == 2 and second["chunks_done_before"] == len(rows) - 2
    items = read_jsonl(ws.synth_dir / "facts.jsonl")
    changed = [it for it in items if it["chunk_sha256"] == [rows[0]["sha256"]]]
    assert changed and any("1963" in json.dumps(it) for it in changed)
    # Items of the old version of the edited chunk remain in the append-only file; readers can drop them.
    current = read_items(ws.synth_dir, current_shas={r["sha256"] for r in rows})
    assert len(current) < len(items)
    assert not any("1962" in json.dumps(it) and "Orvik Observatory was founded" in json.dumps(it) for it in current)


def test_dry_run_plans_without_generating(tmp_path, tiny_model_dir):
    ws = Workspace.at(write_corpus(tmp_path / "ws"))
    plan = run_synth(ws, SynthConfig(strategies=["facts", "qa", "rephrase"], generator=str(tiny_model_dir)),
                     dry_run=True, show_progress=False)
    assert plan["dry_run"] and plan["completion_tokens"] > 0 and plan["estimated_seconds"] >= 0
    assert plan["strategies"]["qa"]["chunks_todo"] == plan["chunks"]
    assert plan["strategies"]["facts"]["items_max"] > 0
    assert not ws.synth_dir.exists() or not list(ws.synth_dir.glob("*.jsonl"))


def test_cli_synth_json_and_exit_codes(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from engrain.cli import app

    write_corpus(tmp_path / "ws")
    res = CliRunner().invoke(app, ["synth", "-w", str(tmp_path / "ws"), "--strategies", "facts", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["strategies"]["facts"]["accepted"] > 0
    # A model strategy that yields nothing at all exits 1 (it went on, but the step produced nothing).
    res = CliRunner().invoke(app, ["synth", "-w", str(tmp_path / "ws"), "--strategies", "qa", "--per-chunk", "1",
                                   "--generator", str(tiny_model_dir), "--json"])
    assert res.exit_code == 1, res.output
    assert "synth" in (tmp_path / "ws" / "engrain.yaml").read_text()
    missing = CliRunner().invoke(app, ["synth", "-w", str(tmp_path / "nothing")])
    assert missing.exit_code != 0 and "ingest" in str(missing.exception)


@pytest.mark.parametrize("batch", [1, 2, 4])  # 2 and 4: finished rows make room for waiting prompts
def test_fastgen_greedy_matches_generate(tiny_lm, monkeypatch, batch):
    from engrain.models import chat_messages, chat_prompt, generate

    questions = ["What is the capital of France?", "Hi", "Tell me about the Orvik Observatory on Mount Tessel.",
                 "Write three words.", "Why is the sky blue? Answer in one sentence for a child."]
    prompts = [chat_prompt(tiny_lm.tokenizer, chat_messages(q)) for q in questions]
    monkeypatch.setenv("ENGRAIN_FASTGEN", "0")
    plain = generate(tiny_lm, prompts, max_new_tokens=24, batch_size=batch)
    monkeypatch.setenv("ENGRAIN_FASTGEN", "1")
    fast = generate(tiny_lm, prompts, max_new_tokens=24, batch_size=batch)
    assert [(g.text, g.completion_tokens, g.finish_reason) for g in fast] == \
        [(g.text, g.completion_tokens, g.finish_reason) for g in plain]


def test_fastgen_stops_rows_and_samples_within_top_p(tiny_lm):
    from engrain.models import fastgen

    tok = tiny_lm.tokenizer
    prompts = [tok("hello there", add_special_tokens=False)["input_ids"]] * 3
    kw = dict(batch_size=3, pad_id=tok.pad_token_id, top_p=0.9)
    # Every token is a stop token: each row ends after one token, and nothing is produced after it.
    out = fastgen.generate_many(tiny_lm.model, prompts, max_new_tokens=5, stop_ids=list(range(len(tok))),
                                temperature=0.8, seed=1, **kw)
    assert len(out) == 3 and all(len(seq) == 1 for seq in out)
    a = fastgen.generate_many(tiny_lm.model, prompts, max_new_tokens=6, stop_ids=[tok.eos_token_id],
                              temperature=0.9, seed=3, **kw)
    b = fastgen.generate_many(tiny_lm.model, prompts, max_new_tokens=6, stop_ids=[tok.eos_token_id],
                              temperature=0.9, seed=3, **kw)
    assert a == b  # seeded sampling is reproducible


@pytest.mark.parametrize("batch", [2, 3])
def test_fastgen_continuous_batching_equals_each_prompt_alone(tiny_lm, batch):
    """Rows that stop early leave the batch and waiting prompts join the running ones (their histories realigned
    into one cache layout); every prompt still gets exactly the greedy tokens it gets when decoded alone."""
    from engrain.models import fastgen

    tok = tiny_lm.tokenizer
    texts = ["hello there", "a much longer prompt about the lighthouse keeper and his log", "Hi", "What is 2+2?",
             "Tell me about the mill on the river", "ok"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    kw = dict(max_new_tokens=10, pad_id=tok.pad_token_id)
    free = [fastgen.generate_many(tiny_lm.model, [p], batch_size=1, stop_ids=[-1], **kw)[0] for p in prompts]
    stops = sorted({free[0][2], free[3][4]})  # some rows stop after 3 or 5 tokens, others run to the limit
    alone = [fastgen.generate_many(tiny_lm.model, [p], batch_size=1, stop_ids=stops, **kw)[0] for p in prompts]
    assert len({len(a) for a in alone}) > 1  # the rows really finish at different steps
    together = fastgen.generate_many(tiny_lm.model, prompts, batch_size=batch, stop_ids=stops, **kw)
    assert together == alone


def test_fastgen_runs_a_peft_lora_model_like_generate(tiny_model_dir, monkeypatch):
    """A LoRA adapter (non-zero, so it changes the output) decodes the same greedy tokens through the fast loop as
    through PEFT's generate(), and disable_adapter() gives the base model's tokens on both paths."""
    import copy
    import dataclasses

    import torch
    from peft import LoraConfig, get_peft_model

    from engrain.models import fastgen
    from engrain.models import chat_messages, chat_prompt, generate, load_model

    base = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    prompts = [chat_prompt(base.tokenizer, chat_messages(q)) for q in ("Hi", "What is the capital of France?")]
    monkeypatch.setenv("ENGRAIN_FASTGEN", "0")
    before = [g.text for g in generate(base, prompts, max_new_tokens=16)]
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(base.model), LoraConfig(r=4, lora_alpha=64, target_modules="all-linear"))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    peft_model.eval()
    lm = dataclasses.replace(base, model=peft_model)
    plain = [g.text for g in generate(lm, prompts, max_new_tokens=16)]
    monkeypatch.setenv("ENGRAIN_FASTGEN", "1")
    assert fastgen.supports(peft_model)
    fast = [g.text for g in generate(lm, prompts, max_new_tokens=16)]
    assert fast == plain and fast != before
    with peft_model.disable_adapter():
        assert [g.text for g in generate(lm, prompts, max_new_tokens=16)] == before


def test_fastgen_shared_prompt_start_runs_once_and_changes_nothing(tiny_lm, monkeypatch):
    """Prompts that share a long start (a system prompt) have it run once and copied into each row's cache;
    across several admissions every prompt still gets the tokens it gets alone, and the cache layout stays
    bounded by one row's history (columns no running row attends are dropped at each admission)."""
    from engrain.models import fastgen

    tok = tiny_lm.tokenizer
    start = tok("You are a careful assistant for the Orvik archive. Answer in a few words.\n",
                add_special_tokens=False)["input_ids"]
    texts = ["hello there", "a much longer question about the lighthouse keeper and his log", "Hi", "2+2?",
             "Tell me about the mill on the river", "ok", "Where is the archive?", "Name the keeper"]
    prompts = [start + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert fastgen.common_start(prompts) == len(start) >= fastgen.MIN_TOKENS
    assert fastgen.common_start(prompts[:1]) == 0  # one prompt: nothing to share
    kw = dict(max_new_tokens=12, pad_id=tok.pad_token_id)
    free = [fastgen.generate_many(tiny_lm.model, [p], batch_size=1, stop_ids=[-1], **kw)[0] for p in prompts]
    kw["stop_ids"] = sorted({free[0][3], free[2][6]})  # rows finish at different steps
    alone = [fastgen.generate_many(tiny_lm.model, [p], batch_size=1, **kw)[0] for p in prompts]
    assert len({len(a) for a in alone}) > 1
    widths = []
    forward = fastgen._forward

    def spy(model, ids, positions, caches, *args, **kwargs):
        widths.append(caches[0][0].shape[2])
        return forward(model, ids, positions, caches, *args, **kwargs)

    monkeypatch.setattr(fastgen, "_forward", spy)
    together = fastgen.generate_many(tiny_lm.model, prompts, batch_size=2, **kw)
    assert together == alone
    # The first forward is the shared start alone; the first prefill after it holds only the two shortest
    # prompts' own tokens next to the copied start.
    assert widths[0] == len(start)
    assert widths[1] == len(start) + 1  # "Hi" and "ok" are one token each
    longest = max(len(p) for p in prompts)
    assert max(widths) <= longest + 2 * kw["max_new_tokens"]

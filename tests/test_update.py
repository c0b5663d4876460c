"""`engrain update`: a trained memory taught the documents added or changed since, without a rebuild, with the
documents it learned recorded, removed ones reported (not unlearned, not rehearsed), and a crash leaving the old
memory usable and a rerun resuming. Tiny model, model-free `facts` synthesis, real ingest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from engrain.config import IngestConfig, SynthConfig, load_config
from engrain.errors import EngrainError
from engrain.workspace import Workspace

DOCS = {
    "alpha.md": "# Alpha\n\nThe Orvane archive was founded by Marta Kell in 1931. Its vault opens with code 4471. "
                "The archive keeps maps of the northern coast. Visitors sign the green ledger at the gate.\n",
    "beta.md": "# Beta\n\nThe Selby lighthouse stands on Corran Point. Its keeper is Ivo Drent. The lamp turns "
               "every nine seconds. Supplies arrive by boat on Tuesdays.\n",
}
GAMMA = ("# Gamma\n\nThe Tessel mill grinds barley for the valley. Its wheel was rebuilt by Anka Rho in 1978. "
         "The miller sells flour at the Saturday market. The mill pond freezes most winters.\n")
TRAIN = {"memory": "lora", "lora_rank": 4, "lr": 5e-3, "seq_len": 128, "micro_batch": 1, "replay_share": 0.0,
         "epochs": 1.0, "save_every": 0, "update_epochs": 1.0, "update_rehearsal": 0.5}


def make_ws(root: Path, tokenizer, **train) -> tuple[Workspace, Path]:
    docs = root / "docs"
    docs.mkdir(parents=True)
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    ws = Workspace.at(root / "ws").ensure()
    ws.config_path.write_text(yaml.safe_dump({"train": {**TRAIN, **train},
                                              "synth": {"facts_per_chunk": 4, "facts_orders": 1}}))
    reingest(ws, docs, tokenizer)
    return ws, docs


def reingest(ws: Workspace, docs: Path, tokenizer) -> None:
    from engrain.corpus.ingest import ingest

    ingest(docs, ws, IngestConfig(chunk_tokens=64, chunk_overlap=8), tokenizer=tokenizer)


def trained(ws: Workspace, model_dir: Path) -> dict:
    from engrain.synth.run import run_synth
    from engrain.train.loop import train

    cfg = load_config(ws.config_path)
    run_synth(ws, SynthConfig(**cfg.synth.model_dump()), show_progress=False)
    return train(ws, cfg.train, str(model_dir), show_progress=False)


def run_update(ws: Workspace, model_dir: Path, **kw) -> dict:
    from engrain.train.update import update

    return update(ws, load_config(ws.config_path), str(model_dir), show_progress=False, **kw)


def cli(ws: Workspace, model_dir: Path, *extra: str):
    from typer.testing import CliRunner

    from engrain.cli import app

    result = CliRunner().invoke(app, ["update", "-w", str(ws.root), "--model", str(model_dir), *extra])
    assert result.exit_code == 0, result.output
    return result


def meta(ws: Workspace, name: str = "lora") -> dict:
    return json.loads((ws.memory_dir(name) / "engrain_memory.json").read_text())


def adapter(ws: Workspace) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ws.memory_dir("lora") / "adapter_model.safetensors"))


def doc_hash(ws: Workspace, doc_id: str) -> str:
    from engrain.corpus.schema import read_documents

    return next(d.sha256 for d in read_documents(ws) if d.id == doc_id)


def test_update_after_add_learns_the_new_document(tmp_path, tokenizer, tiny_model_dir, tiny_lm):
    import torch

    from engrain.memory.registry import open_memory

    ws, docs = make_ws(tmp_path, tokenizer)
    first = trained(ws, tiny_model_dir)
    assert set(first["learned_documents"]) == {"alpha", "beta"}  # every trained memory records what it learned
    before = adapter(ws)
    # The update starts from the saved adapter: loaded into a freshly attached LoRA, it gives back the same tensors.
    from engrain.memory.parametric import get_kind, trainable_state
    from engrain.models import load_model
    from engrain.train.update import load_previous_weights

    fresh = get_kind("lora").attach(load_model(str(tiny_model_dir), device="cpu", dtype="float32").model, tokenizer, first["config"], ws)
    load_previous_weights("lora", fresh, ws.memory_dir("lora"))
    loaded = {k.replace(".default.", "."): v for k, v in trainable_state(fresh).items()}
    assert loaded.keys() == before.keys() and all(torch.equal(loaded[k], before[k]) for k in before)
    (docs / "gamma.md").write_text(GAMMA)
    reingest(ws, docs, tokenizer)

    summary = run_update(ws, tiny_model_dir)
    record = summary["update"]
    assert record["documents"]["new"] == ["gamma"] and record["documents"]["changed"] == []
    assert record["items"]["new"] > 0 and 0 < record["items"]["rehearsed"] <= record["items"]["new"]
    assert summary["learned_documents"]["gamma"] == doc_hash(ws, "gamma")
    assert {"alpha", "beta"} <= set(summary["learned_documents"])  # nothing forgotten in the record
    assert summary["steps"] == first["steps"] + record["steps"] and record["steps"] > 0
    assert summary["previous"]["steps"] == first["steps"]
    assert set(summary["previous"]["learned_documents"]) == {"alpha", "beta"}
    assert meta(ws) == summary and summary["config"] == first["config"]  # the recipe is still the memory's
    after = adapter(ws)
    assert after.keys() == before.keys() and any(not torch.equal(after[k], before[k]) for k in after)
    open_memory("lora", ws, tiny_lm)  # the updated memory loads
    assert run_update(ws, tiny_model_dir)["nothing_to_do"]  # and a second update has nothing to learn


def test_a_full_memory_updates_too(tmp_path, tokenizer, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    ws, docs = make_ws(tmp_path, tokenizer, memory="full", lr=1e-3)
    trained(ws, tiny_model_dir)
    before = load_file(str(ws.memory_dir("full") / "model.safetensors"))
    (docs / "gamma.md").write_text(GAMMA)
    reingest(ws, docs, tokenizer)
    summary = run_update(ws, tiny_model_dir)
    assert summary["kind"] == "full" and "gamma" in summary["learned_documents"] and summary["update"]["steps"] > 0
    after = load_file(str(ws.memory_dir("full") / "model.safetensors"))
    assert any(not torch.equal(after[k], before[k]) for k in before)


def test_a_prefix_memory_continues_from_its_saved_prefix(tmp_path, tokenizer, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    from engrain.memory.parametric import get_kind
    from engrain.models import load_model
    from engrain.train.update import load_previous_weights

    ws, docs = make_ws(tmp_path, tokenizer, memory="prefix", lr=1e-2, options={"prefix": {"length": 8}})
    first = trained(ws, tiny_model_dir)
    before = load_file(str(ws.memory_dir("prefix") / "prefix.safetensors"))
    (docs / "gamma.md").write_text(GAMMA)
    reingest(ws, docs, tokenizer)
    # Attached afresh, the prefix is read from today's corpus; continued, it is the saved one again, sink included.
    fresh = get_kind("prefix").attach(load_model(str(tiny_model_dir), device="cpu", dtype="float32").model, tokenizer,
                                      first["config"], ws)
    assert not torch.equal(fresh.prefix_kv()[0], before["keys"])
    load_previous_weights("prefix", fresh, ws.memory_dir("prefix"))
    assert all(torch.equal(t, before[n]) for t, n in zip(fresh.prefix_kv(), ("keys", "values")))

    summary = run_update(ws, tiny_model_dir)
    assert summary["kind"] == "prefix" and "gamma" in summary["learned_documents"] and summary["update"]["steps"] > 0
    after = load_file(str(ws.memory_dir("prefix") / "prefix.safetensors"))
    assert not torch.equal(after["values"], before["values"])


def test_a_memory_layer_update_steers_clear_of_slots_earlier_documents_read(tmp_path, tokenizer, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    from engrain.memory.continued import continue_memory_layer
    from engrain.memory.memory_layer import memories
    from engrain.memory.parametric import get_kind
    from engrain.models import load_model
    from engrain.train.update import chunk_texts

    small = {"slots": 256, "heads": 2, "topk": 4, "key_dim": 16, "top_t": 16, "layers": "middle"}
    ws, docs = make_ws(tmp_path, tokenizer, memory="memory_layer", lr=0.05, options={"memory_layer": small})
    first = trained(ws, tiny_model_dir)
    folder = ws.memory_dir("memory_layer")
    before = load_file(str(folder / "memory_layer.safetensors"))

    def attached():
        model = load_model(str(tiny_model_dir), device="cpu", dtype="float32").model
        return get_kind("memory_layer").attach(model, tokenizer, first["config"], ws)

    plain, steered = attached(), attached()
    continue_memory_layer(plain, folder, tokenizer, [])
    continue_memory_layer(steered, folder, tokenizer, chunk_texts(ws, {"alpha", "beta"}))
    for module in (plain, steered):  # the saved memory is back in place of the fresh one
        mem = memories(module)[0]
        assert torch.equal(mem.values, before[f"layers.{mem.layer_idx}.values"])
    # Slots the learned documents read count as background: their IDF falls, so new batches pick other slots.
    idf_plain, idf_steered = memories(plain)[0].idf, memories(steered)[0].idf
    assert bool((idf_steered < idf_plain - 1e-6).any())

    (docs / "gamma.md").write_text(GAMMA)
    reingest(ws, docs, tokenizer)
    summary = run_update(ws, tiny_model_dir)
    assert summary["kind"] == "memory_layer" and "gamma" in summary["learned_documents"]
    assert summary["update"]["steps"] > 0
    after = load_file(str(folder / "memory_layer.safetensors"))
    assert any(not torch.equal(after[k], before[k]) for k in before)


def test_update_after_change_records_the_new_hash(tmp_path, tokenizer, tiny_model_dir):
    ws, docs = make_ws(tmp_path, tokenizer)
    trained(ws, tiny_model_dir)
    old_hash = doc_hash(ws, "beta")
    (docs / "beta.md").write_text(DOCS["beta.md"].replace("Ivo Drent", "Lena Morrow"))
    reingest(ws, docs, tokenizer)

    summary = run_update(ws, tiny_model_dir)
    record = summary["update"]
    assert record["documents"]["changed"] == ["beta"] and record["documents"]["new"] == []
    assert summary["learned_documents"]["beta"] == doc_hash(ws, "beta") != old_hash
    assert summary["previous"]["learned_documents"]["beta"] == old_hash
    assert record["items"]["stale"] > 0  # the old version's items are not trained on again


def test_removed_documents_are_reported_and_not_rehearsed(tmp_path, tokenizer, tiny_model_dir, monkeypatch):
    from engrain.train import plan

    ws, docs = make_ws(tmp_path, tokenizer)
    trained(ws, tiny_model_dir)
    (docs / "beta.md").unlink()
    reingest(ws, docs, tokenizer)
    result = cli(ws, tiny_model_dir)  # only a removal: nothing to train, the record says so
    assert "1 removed, facts not unlearned" in result.output
    alone = meta(ws)
    assert alone["update"]["documents"]["removed"] == ["beta"]
    assert alone["update"]["documents"]["removed_note"] == "removed, facts not unlearned"
    assert "steps" not in alone["update"] and "beta" not in alone["learned_documents"]
    assert "beta" in alone["removed_documents"] and meta(ws) == alone

    (docs / "gamma.md").write_text(GAMMA)
    reingest(ws, docs, tokenizer)
    seen: list[dict] = []
    real = plan.make_plan

    def spy(*args, **kw):
        seen.extend(item for _, item in kw["items"])
        return real(*args, **kw)

    monkeypatch.setattr(plan, "make_plan", spy)
    summary = run_update(ws, tiny_model_dir)
    assert summary["update"]["documents"]["new"] == ["gamma"] and summary["update"]["items"]["rehearsed"] > 0
    docs_trained = {d for item in seen for d in item["doc_ids"]}
    assert docs_trained == {"alpha", "gamma"}  # beta's items are no longer rehearsed
    assert "beta" in summary["removed_documents"] and "beta" not in summary["learned_documents"]


def test_nothing_to_do_leaves_the_memory_alone(tmp_path, tokenizer, tiny_model_dir):
    ws, _ = make_ws(tmp_path, tokenizer)
    trained(ws, tiny_model_dir)
    before = (ws.memory_dir("lora") / "engrain_memory.json").read_bytes()
    result = cli(ws, tiny_model_dir, "--json")
    assert json.loads(result.stdout.strip().splitlines()[-1])["nothing_to_do"]
    assert (ws.memory_dir("lora") / "engrain_memory.json").read_bytes() == before


def test_a_crash_during_an_update_keeps_the_old_memory_and_the_rerun_resumes(tmp_path, tokenizer, tiny_model_dir,
                                                                            tiny_lm, monkeypatch):
    from engrain.memory.registry import open_memory
    from engrain.train.loop import Run

    ws, docs = make_ws(tmp_path, tokenizer, save_every=2, update_epochs=2.0)
    first = trained(ws, tiny_model_dir)
    (docs / "gamma.md").write_text(GAMMA)
    reingest(ws, docs, tokenizer)
    real = Run.checkpoint

    def crash(self):  # a kill right after the update's first checkpoint
        real(self)
        raise RuntimeError("killed")

    monkeypatch.setattr(Run, "checkpoint", crash)
    with pytest.raises(RuntimeError, match="killed"):
        run_update(ws, tiny_model_dir)
    assert meta(ws) == first  # the previous memory, untouched and loadable
    open_memory("lora", ws, tiny_lm)
    assert any((ws.root / "train" / "lora" / "checkpoints").iterdir())

    monkeypatch.setattr(Run, "checkpoint", real)
    assert "updated lora: 1 new, 0 changed documents" in cli(ws, tiny_model_dir).output
    summary = meta(ws)
    assert summary["update"]["resumed_from_step"] == 2 and summary["update"]["steps"] > 2
    assert summary["update"]["seconds"] > summary["update"]["resumed_seconds"] > 0
    assert "gamma" in summary["learned_documents"]
    assert not (ws.root / "train" / "lora" / "checkpoints").exists()


def test_bad_input_says_what_to_do(tmp_path, tokenizer, tiny_model_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    ws, docs = make_ws(tmp_path, tokenizer)
    with pytest.raises(EngrainError, match="No trained memory 'lora'") as err:
        run_update(ws, tiny_model_dir)
    assert "engrain train" in err.value.hint

    trained(ws, tiny_model_dir)
    (docs / "gamma.md").write_text(GAMMA)
    reingest(ws, docs, tokenizer)
    other = tmp_path / "other-model"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(EngrainError, match="was trained on model") as err:
        run_update(ws, other)
    assert "--model" in err.value.hint

    legacy = meta(ws)
    del legacy["learned_documents"]
    (ws.memory_dir("lora") / "engrain_memory.json").write_text(json.dumps(legacy))
    with pytest.raises(EngrainError, match="before engrain recorded") as err:
        run_update(ws, tiny_model_dir)
    assert "--force" in err.value.hint


def test_a_memory_moved_aside_by_a_killed_save_is_put_back(tmp_path):
    from engrain.train.checkpoints import recover_memory

    ws = Workspace.at(tmp_path / "ws")
    aside = ws.memories_dir / ".lora.old-123"
    aside.mkdir(parents=True)
    (aside / "engrain_memory.json").write_text("{}")
    recover_memory(ws, "lora")
    assert (ws.memory_dir("lora") / "engrain_memory.json").is_file() and not aside.exists()

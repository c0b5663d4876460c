"""The product-key memory layer: identity when attached, only its own parameters train, sparse updates touch
only the rows a batch read (and, with top_t, only the TF-IDF top rows), save/load round trip, mismatch errors."""

from __future__ import annotations

import copy

import pytest
import torch

from engrain.atomic import write_json
from engrain.errors import EngrainError
from engrain.memory.memory_layer import (MemoryLayerKind, ProductKeyMemory, RowSparseAdamW, background_ids,
                                         memories, read_through, select_rows)
from engrain.memory.parametric import META_FILE, model_fingerprint, read_meta
from engrain.models import LM, generate
from engrain.workspace import Workspace

SMALL = {"slots": 256, "heads": 2, "topk": 4, "key_dim": 16}
TEXT = ["Mara Olsen founded Veltrix Systems in Tromsø in 1987.", "The tide gauge sold 212 units in its first year."]


def attach(lm, tmp_path, **opts):
    model = copy.deepcopy(lm.model)
    cfg = {"options": {"memory_layer": {**SMALL, **opts}}}
    return MemoryLayerKind().attach(model, lm.tokenizer, cfg, Workspace.at(tmp_path / "ws"))


def batch(lm, texts=TEXT):
    enc = lm.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def train_step(model, opt, ids, mask):
    kind = MemoryLayerKind()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    kind.sparse_grad_hook(model)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def test_attaching_is_identity_and_only_memory_params_train(tiny_lm, tmp_path):
    ids, mask = batch(tiny_lm)
    with torch.no_grad():
        before = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
    model = attach(tiny_lm, tmp_path, layers=[0, 1], train_keys=True)
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    assert [m.layer_idx for m in memories(model)] == [0, 1]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.mlp.memory.{p}" for i in (0, 1)
                         for p in ("query.weight", "sub_keys", "values")}
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    for mem in memories(model):
        rows_with_grad = (mem.values.grad != 0).any(dim=1)
        # Gradient only on rows read (a row read only where no loss is taken gets none).
        assert rows_with_grad.any() and not (rows_with_grad & (mem.reads == 0)).any()


def test_by_default_only_the_values_of_three_blocks_train():
    from engrain.memory.memory_layer import MemoryLayerOptions, resolve_layers

    opts = MemoryLayerOptions()
    assert not opts.train_keys and resolve_layers(opts.layers, 30) == [7, 15, 22]
    assert MemoryLayerKind.default_lr == 0.1


def test_sparse_update_moves_only_rows_the_batch_read(tiny_lm, tmp_path):
    model = attach(tiny_lm, tmp_path, top_t=0, train_keys=False)
    model.train()
    opt = MemoryLayerKind().make_optimizer(model, lr=0.05, weight_decay=0.1)
    mem = memories(model)[0]
    train_step(model, opt, *batch(tiny_lm, TEXT[:1]))  # gives many rows momentum
    ids, mask = batch(tiny_lm, ["Completely different words about rivers and bread."])
    before = mem.values.detach().clone()
    model(input_ids=ids, attention_mask=mask)  # count what this batch reads without a gradient step
    read = mem.reads > 0
    mem.reads.zero_()
    train_step(model, opt, ids, mask)
    changed = (mem.values.detach() != before).any(dim=1)
    assert changed.any()
    assert not (changed & ~read).any(), "a row the batch did not read was moved (momentum or weight decay)"
    # Plain AdamW would have moved rows read only in the first step: the property is not trivial.
    assert (before.abs().sum(1) > 0).logical_and(~read).any()


def test_top_t_keeps_only_the_highest_tf_idf_rows(tiny_lm, tmp_path):
    model = attach(tiny_lm, tmp_path, top_t=5)
    mem = memories(model)[0]
    # Background text (the package's general prompts) was read at attach: common slots got a lower IDF.
    assert model.engrain_background_tokens > 0
    assert mem.idf.min() < mem.idf.max()
    model.train()
    opt = MemoryLayerKind().make_optimizer(model, lr=0.05, weight_decay=0.0)
    before = mem.values.detach().clone()
    ids, mask = batch(tiny_lm)
    train_step(model, opt, ids, mask)
    changed = (mem.values.detach() != before).any(dim=1)
    assert 0 < int(changed.sum()) <= 5

    # The rule itself: TF x IDF, so a slot general text uses a lot loses to a rarer one read less often.
    probe = ProductKeyMemory(8, 16, heads=1, topk=2, key_dim=4)
    probe.reads.copy_(torch.tensor([9.0, 3.0, 2.0] + [0.0] * 13))
    probe.idf.copy_(torch.tensor([0.1, 2.0, 2.0] + [5.0] * 13))
    assert select_rows(probe, 2).nonzero().flatten().tolist() == [1, 2]
    assert select_rows(probe, 0).nonzero().flatten().tolist() == [0, 1, 2]


def test_training_lowers_loss_and_round_trips(tiny_lm, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = attach(tiny_lm, tmp_path, top_t=0, standardize=True)  # the round trip carries its input statistics
    model.train()
    opt = MemoryLayerKind().make_optimizer(model, lr=0.05, weight_decay=0.0)
    ids, mask = batch(tiny_lm)
    losses = [train_step(model, opt, ids, mask) for _ in range(10)]
    assert losses[-1] < losses[0] - 0.5
    model.eval()

    folder = tmp_path / "ws" / "memories" / "memory_layer"
    folder.mkdir(parents=True)
    MemoryLayerKind().save(model, folder, {"base_model": "tiny"})
    write_json(folder / META_FILE, {"kind": "memory_layer", "base_fingerprint": model_fingerprint(tiny_lm.model)})
    assert (folder / "memory_layer.safetensors").is_file() and (folder / "memory_config.json").is_file()
    loaded = MemoryLayerKind().load(copy.deepcopy(tiny_lm.model), tiny_lm.tokenizer, folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    gens = generate(LM(model=loaded, tokenizer=tiny_lm.tokenizer, name="tiny+memory", path="", device="cpu"),
                    ["Who founded Veltrix Systems?"], max_new_tokens=4)
    assert gens[0].completion_tokens > 0

    cfg = tiny_lm.model.config.to_dict()
    cfg.update(num_hidden_layers=3)
    other = LlamaForCausalLM(LlamaConfig(**cfg))
    with pytest.raises(EngrainError, match="does not match"):
        MemoryLayerKind().load(other, tiny_lm.tokenizer, folder)
    (folder / META_FILE).write_text('{"kind": "memory_layer"}')  # no fingerprint: the memory's own config catches it
    with pytest.raises(EngrainError, match="hidden size 64 and 2 blocks"):
        MemoryLayerKind().load(other, tiny_lm.tokenizer, folder)


def test_the_lookup_reads_standardised_inputs(tiny_lm, tmp_path):
    """With ``standardize``, each memory measures its input's mean and std on general text at attach, so the query
    sees each dimension centred and unit-scaled there; without it (the default) the query reads the raw input."""
    model = attach(tiny_lm, tmp_path, layers=[0, 1], standardize=True)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.setdefault(mod.layer_idx, []).append(args[0]))
             for m in memories(model)]
    with torch.no_grad():
        read_through(model, background_ids(tiny_lm.tokenizer))
    for h in hooks:
        h.remove()
    for mem in memories(model):
        x = torch.cat([t.reshape(-1, mem.hidden) for t in seen[mem.layer_idx]]).double()
        assert x.mean(0).abs().max() > 0.05  # the raw input is not centred: the test is not trivial
        z = (x - mem.in_mean.double()) * mem.in_scale.double()
        torch.testing.assert_close(z.mean(0), torch.zeros(mem.hidden, dtype=torch.double), atol=1e-3, rtol=0)
        torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(mem.hidden, dtype=torch.double),
                                   atol=1e-2, rtol=0)
    raw = memories(attach(tiny_lm, tmp_path))[0]
    assert not raw.in_mean.any() and bool((raw.in_scale == 1).all())


def test_a_memory_saved_before_standardising_loads_unstandardised(tiny_lm, tmp_path):
    from safetensors.torch import load_file, save_file

    model = attach(tiny_lm, tmp_path, standardize=False, top_t=0)
    model.train()
    train_step(model, MemoryLayerKind().make_optimizer(model, lr=0.05, weight_decay=0.0), *batch(tiny_lm))
    model.eval()
    folder = tmp_path / "old"
    folder.mkdir()
    MemoryLayerKind().save(model, folder, {"base_model": "tiny"})
    write_json(folder / META_FILE, {"kind": "memory_layer", "base_fingerprint": model_fingerprint(tiny_lm.model)})
    weights = folder / "memory_layer.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if ".in_" not in k}, str(weights))
    loaded = MemoryLayerKind().load(copy.deepcopy(tiny_lm.model), tiny_lm.tokenizer, folder)
    ids, mask = batch(tiny_lm)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)


def test_optimizer_state_survives_a_checkpoint_round_trip(tiny_lm, tmp_path):
    model = attach(tiny_lm, tmp_path, top_t=0)
    model.train()
    opt = MemoryLayerKind().make_optimizer(model, lr=0.05, weight_decay=0.0)
    train_step(model, opt, *batch(tiny_lm))
    state = copy.deepcopy(opt.state_dict())
    again = MemoryLayerKind().make_optimizer(model, lr=0.05, weight_decay=0.0)
    again.load_state_dict(state)
    assert isinstance(again, RowSparseAdamW)
    for a, b in zip(opt.state.values(), again.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_options(tiny_lm, tmp_path):
    for opts, match in [({"slots": 200}, "square"), ({"topk": 99}, "topk"), ({"layers": [7]}, "blocks 0..1"),
                        ({"lyers": "middle"}, "Unknown memory_layer option"), ({"top_t": -1}, "top_t"),
                        ({"heads": 0}, "memory_layer.heads"), ({"key_dim": 15}, "memory_layer.key_dim"),
                        ({"slots": "many"}, "memory_layer.slots must be an integer")]:
        with pytest.raises(EngrainError, match=match):
            attach(tiny_lm, tmp_path, **opts)


def test_trains_through_the_trainer_and_answers_as_a_memory(tmp_path, tiny_model_dir, tiny_lm):
    """`engrain train --memory memory_layer` uses this kind's optimizer and sparse hook; `ask` loads it back."""
    from engrain.atomic import write_jsonl
    from engrain.config import TrainConfig
    from engrain.memory.registry import open_memory
    from engrain.train.loop import train

    ws = Workspace.at(tmp_path / "ws")
    ws.synth_dir.mkdir(parents=True)
    write_jsonl(ws.synth_dir / "facts.jsonl", [{"id": f"t{i}", "strategy": "facts", "text": TEXT[i % 2]}
                                               for i in range(6)])
    cfg = TrainConfig(memory="memory_layer", max_steps=3, seq_len=64, micro_batch=2, eval_every=0, save_every=0,
                      replay_share=0.0, lr=0.05, options={"memory_layer": {**SMALL, "top_t": 16}})
    summary = train(ws, cfg, str(tiny_model_dir), show_progress=False)
    assert summary["steps"] == 3
    assert read_meta(ws.memory_dir("memory_layer"))["kind"] == "memory_layer"
    mem = open_memory("memory_layer", ws, tiny_lm)
    values = memories(mem.lm.model)[0].values
    # 3 steps of at most top_t=16 rows each: the rest of the 256 slots are still exactly zero.
    assert 0 < int((values != 0).any(dim=1).sum()) <= 3 * 16
    assert mem.answer(["Who founded Veltrix Systems?"], max_new_tokens=4)[0].prompt_tokens > 0
    from engrain.models import load_model

    bf16 = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")  # what answers where bf16 is native
    assert open_memory("memory_layer", ws, bf16).answer(["Who founded Veltrix Systems?"], max_new_tokens=4)[0].text is not None


def test_the_old_kind_name_still_works_with_a_notice(capsys):
    """`memory` was the memory layer's name: typed anywhere (CLI, --methods, engrain.yaml) it maps to memory_layer
    and says so once on stderr."""
    from engrain.config import TrainConfig
    from engrain.evaluate.run import parse_methods
    from engrain.memory import kinds

    kinds._noted.clear()
    assert kinds.canonical("memory") == "memory_layer" and kinds.canonical(" Memory+rag") == "memory_layer+rag"
    assert kinds.canonical("lora+rag") == "lora+rag"
    assert capsys.readouterr().err.count("now called 'memory_layer'") == 1  # one notice, not one per lookup
    cfg = TrainConfig(memory="memory", options={"memory": {"slots": 256}})
    assert cfg.memory == "memory_layer" and cfg.options == {"memory_layer": {"slots": 256}}
    assert parse_methods("base,memory,memory+rag") == ["base", "memory_layer", "memory_layer+rag"]
    kinds._noted.clear()
    assert kinds.canonical("memory", warn=False) == "memory_layer"  # read back from disk: nothing to retype
    assert capsys.readouterr().err == ""


def test_a_memory_saved_under_the_old_kind_name_loads(tiny_lm, tmp_path):
    """A workspace trained before the rename holds memories/memory/ with kind "memory" in its metadata: it opens by
    either name, as the memory layer, and its old options section is still read."""
    from engrain.memory.memory_layer import memory_options
    from engrain.memory.parametric import get_kind
    from engrain.memory.registry import open_memory

    model = attach(tiny_lm, tmp_path)
    ws = Workspace.at(tmp_path / "ws")
    folder = ws.memory_dir("memory")
    folder.mkdir(parents=True)
    MemoryLayerKind().save(model, folder, {"base_model": "tiny"})
    write_json(folder / META_FILE, {"kind": "memory", "base_fingerprint": model_fingerprint(tiny_lm.model)})
    assert isinstance(get_kind(read_meta(folder)["kind"]), MemoryLayerKind)
    for name in ("memory", "memory_layer"):
        mem = open_memory(name, ws, tiny_lm)
        assert mem.folder == folder and isinstance(mem.kind, MemoryLayerKind)
        assert [m.layer_idx for m in memories(mem.lm.model)] == [m.layer_idx for m in memories(model)]
    assert memory_options({"options": {"memory": SMALL}}).slots == SMALL["slots"]

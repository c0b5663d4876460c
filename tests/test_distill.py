"""The distillation loss: teacher targets (the base model with the source chunk in its prompt), their cache, and
their alignment with the trainer's loss positions after packing."""

from __future__ import annotations

import json

import pytest

from engrain.config import TrainConfig
from engrain.corpus.schema import Chunk
from engrain.workspace import Workspace

CHUNK = ("The Orvane archive keeps nine vaults under the old harbour. Vault four opens with code 159 and holds "
         "the charter of the canal guild, signed by Ada Varga in the spring of 1731.")


def make_ws(tmp_path, chunk_text: str = CHUNK) -> Workspace:
    ws = Workspace.at(tmp_path / "ws").ensure()
    ws.chunks_path.parent.mkdir(parents=True, exist_ok=True)
    chunk = Chunk(id="orvane#1", doc_id="orvane", text=chunk_text, start=0, end=len(chunk_text))
    ws.chunks_path.write_text(json.dumps(chunk.to_dict()) + "\n")
    rows = [
        {"id": "q1", "chunk_ids": ["orvane#1"], "messages": [
            {"role": "user", "content": "Which code opens vault four?"}, {"role": "assistant", "content": "159"}]},
        {"id": "q2", "chunk_ids": ["orvane#1"], "messages": [
            {"role": "user", "content": "Who signed the charter of the canal guild?"},
            {"role": "assistant", "content": "Ada Varga, in the spring of 1731."}]},
        {"id": "q3", "chunk_ids": ["orvane#1"], "messages": [
            {"role": "user", "content": "How many vaults does the Orvane archive keep?"},
            {"role": "assistant", "content": "Nine."}]},
        {"id": "t1", "chunk_ids": ["orvane#1"], "text": "Vault four of the Orvane archive opens with code 159."},
        {"id": "nochunk", "text": "An item of the user's own, with no source chunk."},
    ]
    ws.synth_dir.mkdir(parents=True, exist_ok=True)
    (ws.synth_dir / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ws


def examples_of(ws, tok):
    from engrain.train.data import encode_item, read_synthetic

    items = read_synthetic(ws)
    return [encode_item(tok, it, key) for key, it in items], dict(items)


def test_teacher_sees_the_chunk_and_sharing_its_start_changes_nothing(tmp_path, embedded_lm):
    """Targets computed with the shared start run once equal a plain forward of each full teacher sequence; the
    teacher prompt is the rag prompt; items without a chunk get no teacher."""
    import torch

    from engrain.train.distill import first_loss_index, teacher_prefix, teacher_targets
    from engrain.models import chat_messages, chat_prompt
    from engrain.train.data import IGNORE

    ws = make_ws(tmp_path)
    tok = embedded_lm.tokenizer
    exs, items = examples_of(ws, tok)
    targets = teacher_targets(ws, embedded_lm, exs, items, top_k=4, ignore=IGNORE, show=False)
    assert set(targets) == {"q1", "q2", "q3", "t1"}

    q1 = next(e for e in exs if e.key == "q1")
    j = first_loss_index(q1.labels, IGNORE)
    prefix = teacher_prefix(tok, items["q1"], q1.ids, j, f"[orvane#1]\n{CHUNK}")
    rag_prompt = chat_prompt(tok, chat_messages("Which code opens vault four?", context=f"[orvane#1]\n{CHUNK}"))
    assert prefix == tok(rag_prompt, add_special_tokens=False)["input_ids"]

    for ex in exs:
        if ex.key not in targets:
            continue
        t = targets[ex.key]
        j = first_loss_index(ex.labels, IGNORE)
        assert len(t.ids) == ex.n_loss == len(ex.ids) - j
        prefix = teacher_prefix(tok, items[ex.key], ex.ids, j, f"[orvane#1]\n{CHUNK}")
        with torch.no_grad():
            logits = embedded_lm.model(input_ids=torch.tensor([prefix + ex.ids[j:]])).logits[0]
        lp = torch.log_softmax(logits[len(prefix) - 1:len(prefix) - 1 + ex.n_loss].float(), -1)
        top = lp.topk(4, -1)
        assert torch.tensor(t.logprobs) == pytest.approx(top.values, abs=2e-3)
        assert t.ids[0][0] == int(top.indices[0, 0])

    # The chunk helps: with it in view the teacher is surer of the answer's digits after the first ("1" -> "59").
    with torch.no_grad():
        alone = torch.log_softmax(embedded_lm.model(input_ids=torch.tensor([q1.ids])).logits[0].float(), -1)
    j = first_loss_index(q1.labels, IGNORE)
    for m in (1, 2):
        teacher = dict(zip(targets["q1"].ids[m], targets["q1"].logprobs[m]))
        assert teacher.get(q1.ids[j + m], -99.0) > float(alone[j + m - 1, q1.ids[j + m]]) + 1.0


def test_teacher_targets_are_cached_and_resume(tmp_path, tiny_lm, monkeypatch):
    from engrain.train import distill
    from engrain.train.data import IGNORE

    ws = make_ws(tmp_path)
    exs, items = examples_of(ws, tiny_lm.tokenizer)
    calls = []
    real = distill._run_group
    monkeypatch.setattr(distill, "_run_group", lambda m, jobs, *a: calls.append(len(jobs)) or real(m, jobs, *a))
    first = distill.teacher_targets(ws, tiny_lm, exs, items, 4, IGNORE, show=False)
    assert sorted(calls) == [1, 3]  # one group for the chat items of the chunk, one for its text item
    calls.clear()
    again = distill.teacher_targets(ws, tiny_lm, exs, items, 4, IGNORE, show=False)
    assert calls == [] and {k: v.ids for k, v in again.items()} == {k: v.ids for k, v in first.items()}

    # A crash tore the last line: only that group is computed again.
    path = distill.cache_path(ws, tiny_lm, 4)
    text = path.read_text()
    path.write_text(text[:-40])
    distill.teacher_targets(ws, tiny_lm, exs, items, 4, IGNORE, show=False)
    assert len(calls) == 1

    # A changed chunk changes what the teacher saw: everything is computed again.
    calls.clear()
    ws2 = make_ws(tmp_path, CHUNK.replace("159", "160"))
    distill.teacher_targets(ws2, tiny_lm, exs, items, 4, IGNORE, show=False)
    assert sorted(calls) == [1, 3]


def test_teacher_targets_line_up_with_packed_loss_positions(tiny_lm):
    """With a one-hot teacher on the true next token the distillation loss equals the next-token loss exactly,
    packed or not; any shift of the teacher against the loss positions would break the equality."""
    import torch

    from engrain.train.distill import Teacher
    from engrain.train.data import IGNORE, encode_item
    from engrain.train.packing import collate, loss_sum, pack, unpacked_rows

    tok = tiny_lm.tokenizer
    items = [{"text": "Vault one opens with code 48."},
             {"messages": [{"role": "user", "content": "Code of vault two?"}, {"role": "assistant", "content": "85"}]},
             {"text": "The archive sits under the old harbour of Orvane."}]
    exs = [encode_item(tok, it, str(i)) for i, it in enumerate(items)]
    for ex in exs[:2]:  # the third keeps no teacher: plain next-token loss there
        targets = [x for x in ex.labels if x != IGNORE]
        ex.teacher = Teacher([[t, (t + 1) % 100] for t in targets], [[0.0, -1e4] for _ in targets])
        ex.teacher_weight = 1.0  # train.distill's share, as make_plan sets it
    model = tiny_lm.model
    with torch.no_grad():
        for rows, packing in ((pack(exs, 256), True), (unpacked_rows(exs, 256), False)):
            batch = collate(rows, tok.pad_token_id, packing, "cpu")
            plain, n = loss_sum(model, batch, packing)
            distilled, n2 = loss_sum(model, batch, packing, distill=1.0)
            assert n == n2 == sum(e.n_loss for e in exs)
            assert float(distilled) == pytest.approx(float(plain), rel=1e-5)
        # a teacher split between two tokens changes the loss
        exs[0].teacher.logprobs = [[-0.7, -0.7] for _ in exs[0].teacher.ids]
        batch = collate(pack(exs, 256), tok.pad_token_id, True, "cpu")
        plain, distilled = float(loss_sum(model, batch, True)[0]), float(loss_sum(model, batch, True, distill=1.0)[0])
        assert distilled != pytest.approx(plain, rel=1e-3)


def test_training_with_distillation_records_it(tmp_path, tiny_lm):
    from engrain.train import distill
    from engrain.train.loop import train

    ws = make_ws(tmp_path)
    cfg = TrainConfig(memory="lora", seq_len=128, micro_batch=2, eval_every=0, save_every=0, replay_share=0.0,
                      epochs=1.0, distill=0.5, distill_top_k=8, val_fraction=0.0)
    summary = train(ws, cfg, str(tiny_lm.path), show_progress=False, lm=tiny_lm)
    assert summary["data"]["distill"] == {"weight": 0.5, "hidden_weight": 0.0, "top_k": 8, "items_with_chunks": 4,
                                          "examples_with_teacher": 4}
    assert summary["config"]["distill"] == 0.5
    assert (ws.root / "train" / "distill").is_dir()
    dry = train(ws, cfg.model_copy(update={"distill_top_k": 4}), str(tiny_lm.path), dry_run=True, show_progress=False)
    assert not distill.cache_path(ws, tiny_lm, 4).exists()  # a dry run computes nothing
    assert dry["distill"]["items_with_chunks"] == 4


def test_teacher_hidden_states_are_the_blocks_outputs_and_are_cached(tmp_path, tiny_lm, monkeypatch):
    """The hidden states kept for an example are its teacher sequence's block outputs at the loss positions; they
    are read back from the workspace, and a missing file has its group computed again."""
    import torch

    from engrain.train import distill
    from engrain.train.data import IGNORE

    monkeypatch.setattr(distill, "HIDDEN_EVERY", 1)  # the tiny model's two blocks: the first one's output is checked
    assert distill.hidden_blocks(2) == [0, 1]
    ws = make_ws(tmp_path)
    tok = tiny_lm.tokenizer
    exs, items = examples_of(ws, tok)
    targets = distill.teacher_targets(ws, tiny_lm, exs, items, 4, IGNORE, show=False, hidden=True)
    for ex in exs:
        if ex.key not in targets:
            continue
        j = distill.first_loss_index(ex.labels, IGNORE)
        prefix = distill.teacher_prefix(tok, items[ex.key], ex.ids, j, f"[orvane#1]\n{CHUNK}")
        with torch.no_grad():
            out = tiny_lm.model(input_ids=torch.tensor([prefix + ex.ids[j:]]), output_hidden_states=True)
        block0 = out.hidden_states[1][0, len(prefix) - 1:len(prefix) - 1 + ex.n_loss]
        kept = targets[ex.key].hidden
        assert kept.shape == (ex.n_loss, 2, 64) and kept.dtype == torch.bfloat16
        assert torch.allclose(kept[:, 0].float(), block0, rtol=2e-2, atol=2e-2)

    calls = []
    real = distill._run_group
    monkeypatch.setattr(distill, "_run_group", lambda m, jobs, *a: calls.append(len(jobs)) or real(m, jobs, *a))
    again = distill.teacher_targets(ws, tiny_lm, exs, items, 4, IGNORE, show=False, hidden=True)
    assert calls == []
    assert all(torch.equal(again[k].hidden, targets[k].hidden) for k in targets)
    next(distill.hidden_dir(ws, tiny_lm).glob("*.pt")).unlink()
    distill.teacher_targets(ws, tiny_lm, exs, items, 4, IGNORE, show=False, hidden=True)
    assert len(calls) == 1


def test_teacher_hidden_states_line_up_with_packed_loss_positions(tiny_lm):
    """A teacher whose hidden states are the student's own (each example run alone) adds next to nothing to the
    loss, packed or not; the same states shifted by one position add a clear term."""
    import torch

    from engrain.train.distill import Teacher, block_outputs
    from engrain.train.data import IGNORE, encode_item
    from engrain.train.packing import collate, loss_sum, pack, unpacked_rows

    tok = tiny_lm.tokenizer
    model = tiny_lm.model
    items = [{"text": "Vault one opens with code 48."},
             {"messages": [{"role": "user", "content": "Code of vault two?"}, {"role": "assistant", "content": "85"}]},
             {"text": "The archive sits under the old harbour of Orvane."}]
    exs = [encode_item(tok, it, str(i)) for i, it in enumerate(items)]
    with torch.no_grad():
        for ex in exs[:2]:  # the third keeps no teacher
            with block_outputs(model) as states:
                model(input_ids=torch.tensor([ex.ids]))
            at = [t for t in range(len(ex.ids) - 1) if ex.labels[t + 1] != IGNORE]
            ex.teacher = Teacher([], [], torch.stack([h[0, at] for h in states], dim=1).to(torch.bfloat16))
            ex.hidden_weight = 1.0
        n_hidden = sum(e.n_loss for e in exs[:2])
        for rows, packing in ((pack(exs, 256), True), (unpacked_rows(exs, 256), False)):
            batch = collate(rows, tok.pad_token_id, packing, "cpu")
            with_states = float(loss_sum(model, batch, packing)[0])
            del batch["hidden"]
            plain = float(loss_sum(model, batch, packing)[0])
            assert 0 <= with_states - plain < 0.01 * n_hidden  # bf16 rounding of the stored states only
        exs[1].teacher.hidden = exs[1].teacher.hidden.roll(1, dims=0)
        batch = collate(pack(exs, 256), tok.pad_token_id, True, "cpu")
        shifted = float(loss_sum(model, batch, True)[0])
        assert shifted - plain > 0.05 * exs[1].n_loss


def test_training_with_hidden_state_distillation(tmp_path, tiny_lm):
    from engrain.train.loop import train

    ws = make_ws(tmp_path)
    cfg = TrainConfig(memory="lora", seq_len=128, micro_batch=2, eval_every=0, save_every=0, replay_share=0.0,
                      epochs=1.0, distill_hidden=1.0, distill_top_k=8, val_fraction=0.0)
    summary = train(ws, cfg, str(tiny_lm.path), show_progress=False, lm=tiny_lm)
    assert summary["data"]["distill"]["hidden_weight"] == 1.0
    assert summary["data"]["distill"]["examples_with_teacher"] == 4
    assert any((ws.root / "train" / "distill").glob("*-hidden/*.pt"))

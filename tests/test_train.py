"""The trainer: data rendering and masking, packing, schedule, bad input, LoRA/full memories, dry run."""

from __future__ import annotations

import contextlib
import json
import math
import re

import pytest

from engrain.config import TrainConfig
from engrain.errors import EngrainError
from engrain.workspace import Workspace

FAST = dict(seq_len=128, micro_batch=2, eval_every=3, save_every=0, replay_share=0.0, epochs=1.0)


def write_synth(ws: Workspace, n: int = 12, name: str = "facts.jsonl") -> None:
    """A small synthetic set in the `engrain synth` format: chat items and text items with provenance."""
    rows = []
    for i in range(n):
        rows.append({"id": f"qa-{i}", "strategy": "qa", "chunk_ids": [f"c{i}"], "doc_ids": ["d"], "seed": 0,
                     "messages": [{"role": "user", "content": f"What is the code of vault {i}?"},
                                  {"role": "assistant", "content": f"The code of vault {i} is {i * 37 + 11}."}]})
        rows.append({"id": f"tx-{i}", "strategy": "rephrase", "chunk_ids": [f"c{i}"], "doc_ids": ["d"],
                     "text": f"Vault {i} of the Orvane archive opens with code {i * 37 + 11}."})
    ws.synth_dir.mkdir(parents=True, exist_ok=True)
    (ws.synth_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def ws(tmp_path) -> Workspace:
    w = Workspace.at(tmp_path / "ws")
    write_synth(w)
    return w


# ---------------------------------------------------------------------------------------------------------------
# rendering, masking, packing
# ---------------------------------------------------------------------------------------------------------------


def test_training_prompt_is_the_inference_prompt(tokenizer):
    from engrain.models import chat_messages, chat_prompt, end_of_turn
    from engrain.train.data import encode_item, render_messages

    q, a = "Who designed the Lumen bridge?", "Ada Varga designed it."
    prompt, answer = render_messages(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    served = chat_prompt(tokenizer, chat_messages(q))  # exactly what models.answer() feeds the model
    assert prompt == served
    assert answer == a + end_of_turn(tokenizer)
    ex = encode_item(tokenizer, {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}, "k")
    served_ids = tokenizer(served, add_special_tokens=False)["input_ids"]
    assert ex.ids[:len(served_ids)] == served_ids
    # loss only on the answer (and its end of turn)
    assert all(x == -100 for x in ex.labels[:len(served_ids)])
    assert ex.labels[len(served_ids):] == ex.ids[len(served_ids):]
    assert tokenizer.decode(ex.ids[len(served_ids):]).startswith(a)


def test_item_end_loss_off_leaves_only_the_end_of_turn_out_of_the_loss(tokenizer):
    from engrain.models import end_of_turn
    from engrain.train.data import IGNORE, encode_item

    item = {"messages": [{"role": "user", "content": "Who built the Orvane archive?"},
                         {"role": "assistant", "content": "Mira Holt built the Orvane archive."}]}
    full = encode_item(tokenizer, item, "k")
    cut = encode_item(tokenizer, item, "k", end_loss=False)
    end = tokenizer(end_of_turn(tokenizer), add_special_tokens=False)["input_ids"]
    assert cut.ids == full.ids and full.labels[-len(end):] == end
    assert cut.labels[-len(end):] == [IGNORE] * len(end)
    assert cut.labels[:-len(end)] == full.labels[:-len(end)] and cut.n_loss == full.n_loss - len(end)


def test_a_setting_added_later_matches_a_memory_trained_before_it_at_its_default():
    from engrain.train.checkpoints import config_diff

    new = TrainConfig().model_dump()
    old = {k: v for k, v in new.items() if k != "item_end_loss"}  # trained before the setting existed
    assert config_diff(old, new) == []
    assert config_diff(old, {**new, "item_end_loss": False}) == ["item_end_loss: True -> False"]


def test_a_memory_trained_before_lora_packed_smaller_rows_differs_from_the_new_default_only():
    from engrain.memory.parametric import get_kind
    from engrain.train.checkpoints import config_diff
    from engrain.train.loop import with_kind_defaults

    now = with_kind_defaults(TrainConfig(), get_kind("lora")).model_dump()
    old = {k: v for k, v in now.items() if k != "pack_tokens"}  # trained in rows of seq_len
    assert config_diff(old, now) == [f"pack_tokens: 1024 -> {now['pack_tokens']}"]
    # setting rows of seq_len in engrain.yaml keeps the memory as trained
    kept = with_kind_defaults(TrainConfig(pack_tokens=1024), get_kind("lora")).model_dump()
    assert config_diff(old, kept) == []
    assert config_diff({k: v for k, v in TrainConfig().model_dump().items() if k != "pack_tokens"},
                       TrainConfig().model_dump()) == []  # kinds without their own row size: as before


def test_text_items_take_loss_on_every_predicted_token(tokenizer):
    from engrain.train.data import encode_item

    ex = encode_item(tokenizer, {"text": "The Orvane archive has nine vaults."}, "k")
    assert ex.labels[0] == -100 and ex.labels[1:] == ex.ids[1:]
    assert ex.ids[-1] == tokenizer.eos_token_id


def test_packing_leaves_no_padding_between_examples():
    from engrain.train.data import Example
    from engrain.train.packing import collate, pack

    exs = [Example(list(range(1, n + 1)), [-100] * 2 + list(range(3, n + 1)), f"e{n}") for n in (5, 7, 3, 9, 4)]
    rows = pack(exs, seq_len=16)
    # greedy in order: 5+7+3 = 15 fits one row, 9+4 = 13 the next; rows are not padded
    assert [len(r.ids) for r in rows] == [15, 13]
    assert rows[0].ids == [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3]
    assert rows[0].positions == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2]  # restart at each example
    assert rows[1].positions == list(range(9)) + list(range(4))
    assert sum(r.n_loss for r in rows) == sum(e.n_loss for e in exs)
    # collation pads a micro-batch to its longest row: the padding is one more sequence that takes no loss
    batch = collate(rows, 0, True, "cpu")
    assert batch["position_ids"][1].tolist() == list(range(9)) + list(range(4)) + [0, 1]
    assert batch["labels"][1, -2:].tolist() == [-100, -100]


def test_pack_tokens_makes_smaller_rows_and_keeps_long_examples_whole():
    from engrain.train.data import Example
    from engrain.train.packing import pack

    exs = [Example(list(range(1, n + 1)), [-100] + list(range(2, n + 1)), f"e{n}") for n in (5, 7, 12, 3, 4)]
    rows = pack(exs, seq_len=16, pack_tokens=8)
    # rows of up to 8 tokens; the 12-token example is longer than that and fills a row alone, not cut
    assert [len(r.ids) for r in rows] == [5, 7, 12, 7]
    assert rows[2].ids == list(range(1, 13)) and sum(r.n_loss for r in rows) == sum(e.n_loss for e in exs)
    # where no example is longer than pack_tokens, rows are those of seq_len = pack_tokens
    short = [e for e in exs if len(e.ids) <= 8]
    assert [r.ids for r in pack(short, seq_len=16, pack_tokens=8)] == [r.ids for r in pack(short, seq_len=8)]
    with pytest.raises(ValueError, match="pack_tokens"):
        TrainConfig(seq_len=512, pack_tokens=1024)


def test_lora_packs_its_own_row_size_unless_the_config_sets_one():
    from engrain.memory.parametric import get_kind
    from engrain.train.loop import with_kind_defaults

    lora, prefix = get_kind("lora"), get_kind("prefix")
    assert with_kind_defaults(TrainConfig(), lora).pack_tokens == lora.default_pack_tokens < TrainConfig().seq_len
    assert with_kind_defaults(TrainConfig(pack_tokens=300), lora).pack_tokens == 300  # the config's own wins
    assert with_kind_defaults(TrainConfig(seq_len=256), lora).pack_tokens == 256  # never above seq_len
    assert with_kind_defaults(TrainConfig(), prefix).pack_tokens is None  # measured for LoRA only: seq_len


def test_lora_replays_its_own_sources_unless_the_config_names_them():
    from engrain.memory.parametric import get_kind
    from engrain.train.checkpoints import config_diff
    from engrain.train.loop import with_kind_defaults

    lora, prefix, layer = get_kind("lora"), get_kind("prefix"), get_kind("memory_layer")
    assert with_kind_defaults(TrainConfig(), lora).replay_sources == ["self_distill", "self_prose"]
    assert with_kind_defaults(TrainConfig(replay_sources=["self_distill"]), lora).replay_sources == ["self_distill"]
    # measured for LoRA only: the other kinds replay the base model's chat answers alone, as before
    assert with_kind_defaults(TrainConfig(), prefix).replay_sources == ["self_distill"]
    assert with_kind_defaults(TrainConfig(), layer).replay_sources == ["self_distill"]
    # a LoRA memory trained on the defaults before LoRA+ and the prose replay became them is named as such, not
    # silently reused: its config differs in exactly those two settings
    old = with_kind_defaults(TrainConfig(lora_plus_ratio=1.0, replay_sources=["self_distill"]), lora).model_dump()
    now = with_kind_defaults(TrainConfig(), lora).model_dump()
    assert config_diff(old, now) == ["lora_plus_ratio: 1.0 -> 4.0",
                                     "replay_sources: ['self_distill'] -> ['self_distill', 'self_prose']"]
    # one trained before LoRA+ existed trained at one rate, whatever the default is now
    assert config_diff({k: v for k, v in old.items() if k != "lora_plus_ratio"}, old) == []


@pytest.mark.parametrize("one_call", [False, True], ids=["per-example", "one-masked-call"])
def test_packed_rows_do_not_attend_across_examples(tiny_lm, monkeypatch, one_call):
    """A packed row's loss equals the sum of each example's loss computed alone: the block-diagonal mask works
    and no label leaks across the boundary. Both attention paths: per example (CPU) and one masked call (GPU)."""
    import torch

    from engrain.train.kernels import packed_attention

    monkeypatch.setattr(packed_attention, "use_one_call", lambda *args: one_call)
    from engrain.train.packing import collate, loss_sum, pack, unpacked_rows
    from engrain.train.data import encode_item

    tok = tiny_lm.tokenizer
    items = [{"text": "Vault one opens with code 48."},
             {"messages": [{"role": "user", "content": "Code of vault two?"},
                           {"role": "assistant", "content": "It is 85."}]},
             {"text": "The archive sits under the old harbour of Orvane."}]
    exs = [encode_item(tok, it, str(i)) for i, it in enumerate(items)]
    model = tiny_lm.model
    with torch.no_grad():
        packed = pack(exs, seq_len=256)
        assert len(packed) == 1
        s_packed, n_packed = loss_sum(model, collate(packed, tok.pad_token_id, True, "cpu"), True)
        s_alone, n_alone = 0.0, 0
        for row in unpacked_rows(exs, 256):
            s, n = loss_sum(model, collate([row], tok.pad_token_id, False, "cpu"), False)
            s_alone, n_alone = s_alone + float(s), n_alone + n
    assert n_packed == n_alone == sum(e.n_loss for e in exs)
    assert float(s_packed) == pytest.approx(s_alone, rel=1e-4)


def test_packed_attention_path_follows_the_measurements():
    """bench/bench_packed_attention.py: on a GPU one masked call per row always wins; on a CPU one call per example,
    unless a trained prefix's keys outnumber the row's tokens (1,024 positions: one call 1.15x; 256: per example
    1.16x)."""
    from engrain.train.kernels.packed_attention import use_one_call

    assert use_one_call("cuda", 1024, 0) and use_one_call("cuda", 1024, 256)
    assert not use_one_call("cpu", 1024, 0) and not use_one_call("cpu", 700, 256)
    assert use_one_call("cpu", 700, 1024)


@pytest.mark.parametrize("plain", [False, True], ids=["sdpa", "plain"])
def test_grouped_attention_equals_each_example_alone(plain):
    """Examples batched by length (zero-padded, causal) give each example's own attention, values and gradients,
    through SDPA and through the plain matmul form (which bf16 takes for short groups; run here in fp32)."""
    import torch
    import torch.nn.functional as F

    from engrain.train.kernels.packed_attention import _grouped_row

    torch.manual_seed(0)
    lengths = [5, 70, 1, 130, 20, 64]  # groups: up to 64 tokens (four examples), 128 and 256 (one each)
    segments, start = [], 0
    for n in lengths:
        segments.append((start, start + n))
        start += n
    q, k, v = (torch.randn(h, start, 16, requires_grad=True) for h in (6, 2, 2))
    out = _grouped_row(q, k, v, segments, 0.3, 0.0, True, low_precision=plain)
    ref = torch.cat([F.scaled_dot_product_attention(q[None, :, s:e], k[None, :, s:e], v[None, :, s:e], is_causal=True,
                                                    scale=0.3, enable_gqa=True)[0] for s, e in segments], dim=1)
    assert torch.allclose(out, ref, atol=1e-5)
    weights = torch.randn_like(ref)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_short_groups_take_the_plain_form_in_bf16():
    """Measured (packed_attention.uses_plain_attention): in bf16 the plain matmul form beat SDPA up to 512 tokens;
    in fp32 SDPA keeps every length."""
    from engrain.train.kernels.packed_attention import PLAIN_MAX_TOKENS, uses_plain_attention

    assert uses_plain_attention(64, True) and uses_plain_attention(PLAIN_MAX_TOKENS, True)
    assert not uses_plain_attention(PLAIN_MAX_TOKENS + 1, True)
    assert not uses_plain_attention(64, False)


def test_cosine_schedule_with_warmup():
    from engrain.train.loop import lr_factor

    total, warm = 100, 10
    f = [lr_factor(s, warm, total, 0.1) for s in range(total + 1)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:9], f[1:10]))  # linear warm-up
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # then non-increasing
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[total] == pytest.approx(0.1)


def test_progress_writes_plain_lines_where_stderr_is_a_log(monkeypatch, capsys):
    """Under nohup or in a CI log rich draws nothing until the bar closes: a plain line with the step, the total
    and the ETA is written instead, every LOG_EVERY_S."""
    from engrain import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with progress.Progress(True, 10, 2, "train lora") as bar:
        bar.update(6, "loss 1.50")
    err = capsys.readouterr().err
    assert "train lora 6/10 (60%) loss 1.50 · elapsed 0:00:00 · ETA 0:00:00" in err
    # the ETA is this sitting's pace (steps since a resume) times the steps left
    assert progress.plain_progress("train x", 30, 100, 10, 40.0).endswith("elapsed 0:00:40 · ETA 0:02:20")


def test_data_order_is_deterministic_and_seeded(tokenizer):
    from engrain.train.data import encode_item
    from engrain.train.packing import global_batches

    exs = [encode_item(tokenizer, {"text": f"item {i} " * (i % 5 + 1)}, str(i)) for i in range(40)]
    cfg = TrainConfig(seq_len=64, seed=3)
    a = [[r.ids for r in b] for _, (_e, b) in zip(range(6), global_batches(exs, cfg, 2, True))]
    b = [[r.ids for r in b] for _, (_e, b) in zip(range(6), global_batches(exs, cfg, 2, True))]
    c = [[r.ids for r in b] for _, (_e, b) in zip(range(6), global_batches(exs, TrainConfig(seq_len=64, seed=4), 2, True))]
    assert a == b and a != c


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, words", [
    ("{not json", "not valid JSON"),
    ('{"id": "x"}', "neither 'messages' nor 'text'"),
    ('{"text": "   "}', "non-empty"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "at least a user and an assistant"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]}', "assistant answer"),
    ('{"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}', "robot"),
    ('[1, 2]', "JSON object"),
])
def test_malformed_synthetic_data_names_file_and_line(tmp_path, line, words):
    from engrain.train.data import read_synthetic

    ws = Workspace.at(tmp_path / "ws")
    write_synth(ws, n=2)
    bad = ws.synth_dir / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n\n" + line + "\n")
    with pytest.raises(EngrainError) as err:
        read_synthetic(ws)
    assert f"{bad}:3" in err.value.message and words in err.value.message


def test_missing_or_empty_synthetic_data(tmp_path):
    from engrain.train.data import read_synthetic

    ws = Workspace.at(tmp_path / "ws")
    with pytest.raises(EngrainError, match="No synthetic data"):
        read_synthetic(ws)
    ws.synth_dir.mkdir(parents=True)
    (ws.synth_dir / "qa.jsonl").write_text("\n")
    with pytest.raises(EngrainError, match="empty"):
        read_synthetic(ws)


def test_unknown_memory_kind():
    from engrain.memory.parametric import get_kind

    with pytest.raises(EngrainError, match="Unknown parametric memory"):
        get_kind("nope")


# ---------------------------------------------------------------------------------------------------------------
# training, saving, loading
# ---------------------------------------------------------------------------------------------------------------


def test_lora_trains_saves_peft_layout_and_loads(ws, tiny_model_dir, tiny_lm):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engrain.memory.registry import open_memory
    from engrain.train.loop import train

    cfg = TrainConfig(memory="lora", max_steps=6, lora_rank=4, lr=5e-3, **FAST)
    summary = train(ws, cfg, str(tiny_model_dir), show_progress=False)
    out = ws.memory_dir("lora")
    assert summary["steps"] == 6 and summary["final_train_loss"] < 11.5
    assert summary["best_val_loss"] is not None and summary["data"]["validation"] >= 1
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert (out / "adapter_model.safetensors").is_file()
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_model_dir) and adapter_cfg["r"] == 4
    assert set(adapter_cfg["target_modules"]) >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"}
    log = [json.loads(x) for x in (ws.root / "train" / "lora" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7)) and "val_loss" in log[2]

    # PEFT itself loads the folder as it is
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, str(out))
    ids = torch.tensor([[1, 2, 3, 4]])
    mem = open_memory("lora", ws, tiny_lm)
    with torch.no_grad():
        a = peft_model(input_ids=ids).logits
        b = mem.lm.model(input_ids=ids).logits
        base_logits = tiny_lm.model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, base_logits, atol=1e-4)  # trained, and the caller's base model left untouched
    answers = mem.answer(["What is the code of vault 3?"], max_new_tokens=4)
    assert len(answers) == 1 and answers[0].prompt_tokens > 0
    assert mem.describe()["kind"] == "lora"


def test_lora_plus_moves_b_by_its_ratio_and_a_not_at_all_in_the_first_step(tmp_path, tiny_model_dir):
    """B starts at zero, so the first step's gradient reaches only B; Adam's first step moves each weight by about
    its learning rate, so B moves ``lora_plus_ratio`` times as far as with one rate for both."""
    from safetensors.torch import load_file

    from engrain.train.loop import train

    moved, a = {}, {}
    for ratio in (1.0, 4.0):
        w = Workspace.at(tmp_path / f"ws-{ratio}")
        write_synth(w)
        train(w, TrainConfig(memory="lora", max_steps=1, lora_rank=4, lr=1e-3, weight_decay=0.0,
                             lora_plus_ratio=ratio, **FAST), str(tiny_model_dir), show_progress=False)
        weights = load_file(str(w.memory_dir("lora") / "adapter_model.safetensors"))
        moved[ratio] = sum(t.abs().sum().item() for n, t in weights.items() if "lora_B" in n)
        a[ratio] = {n: t for n, t in weights.items() if "lora_A" in n}
    assert moved[1.0] > 0
    assert moved[4.0] / moved[1.0] == pytest.approx(4.0, rel=0.05)
    assert a[1.0] and all((a[1.0][n] == a[4.0][n]).all() for n in a[1.0])  # the same seeded start, not moved


def test_weight_average_is_the_bias_corrected_moving_average_and_swaps_back():
    """After t updates the average is sum_i (1 - d) d^(t - i) w_i / (1 - d^t); inside ``swapped_in`` the parameters
    hold it, after it their trained values."""
    import torch

    from engrain.train.averaging import WeightAverage

    layer = torch.nn.Linear(2, 1, bias=False)
    avg = WeightAverage(layer, horizon_steps=4)  # decay 0.75
    values = (1.0, 2.0, 3.0, 4.0)
    for value in values:
        with torch.no_grad():
            layer.weight.fill_(value)
        avg.update()
    d, t = 0.75, len(values)
    expected = sum((1 - d) * d ** (t - i) * v for i, v in enumerate(values, start=1)) / (1 - d ** t)
    assert torch.allclose(avg.averaged()["weight"], torch.full((1, 2), expected))
    with avg.swapped_in():
        assert torch.allclose(layer.weight, torch.full((1, 2), expected))
    assert torch.equal(layer.weight, torch.full((1, 2), 4.0))


def test_a_moving_average_is_the_memory_kept(tmp_path, tiny_model_dir):
    """With ``ema_horizon`` and no keep_best the saved adapter is the average: B starts at zero and grows, so its
    average is smaller than the last step's B, and not zero."""
    from safetensors.torch import load_file

    from engrain.train.loop import train

    b_size = {}
    for horizon in (0.0, 0.5):
        w = Workspace.at(tmp_path / f"ws-{horizon}")
        write_synth(w)
        # one rate for A and B: LoRA+'s larger steps for B leave too few steps' difference at this size
        summary = train(w, TrainConfig(memory="lora", max_steps=4, lora_rank=4, lr=1e-3, keep_best=False,
                                       lora_plus_ratio=1.0, ema_horizon=horizon, **FAST), str(tiny_model_dir),
                        show_progress=False)
        assert summary["steps"] == 4
        weights = load_file(str(w.memory_dir("lora") / "adapter_model.safetensors"))
        b_size[horizon] = sum(t.abs().sum().item() for n, t in weights.items() if "lora_B" in n)
    assert 0 < b_size[0.5] < 0.9 * b_size[0.0]


def test_loading_onto_another_model_is_refused(ws, tiny_model_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from engrain.memory.registry import open_memory
    from engrain.models import load_model
    from engrain.train.loop import train

    train(ws, TrainConfig(memory="lora", max_steps=1, lora_rank=2, **FAST), str(tiny_model_dir), show_progress=False)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    folder = tmp_path / "other"
    other.save_pretrained(folder)
    load_model(str(tiny_model_dir)).tokenizer.save_pretrained(folder)
    with pytest.raises(EngrainError, match="does not match the loaded model"):
        open_memory("lora", ws, load_model(str(folder), device="cpu"))


def test_changed_config_is_refused_unless_forced(ws, tiny_model_dir):
    from engrain.train.loop import train

    cfg = TrainConfig(memory="lora", max_steps=2, lora_rank=2, **FAST)
    train(ws, cfg, str(tiny_model_dir), show_progress=False)
    assert train(ws, cfg, str(tiny_model_dir), show_progress=False)["already_trained"]
    changed = cfg.model_copy(update={"lr": 0.01})
    with pytest.raises(EngrainError) as err:
        train(ws, changed, str(tiny_model_dir), show_progress=False)
    assert "lr: None -> 0.01" in err.value.message
    assert train(ws, changed, str(tiny_model_dir), force=True, show_progress=False)["learning_rate"] == 0.01


def test_full_finetune_trains_and_loads(ws, tiny_model_dir, tiny_lm):
    import torch

    from engrain.memory.registry import open_memory
    from engrain.train.loop import train

    summary = train(ws, TrainConfig(memory="full", max_steps=3, lr=1e-3, **FAST), str(tiny_model_dir),
                    show_progress=False)
    assert summary["trainable_params"] == sum(p.numel() for p in tiny_lm.model.parameters())
    mem = open_memory("full", ws, tiny_lm)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert not torch.allclose(mem.lm.model(input_ids=ids).logits, tiny_lm.model(input_ids=ids).logits)


def test_export_merge_matches_adapter(ws, tiny_model_dir, tiny_lm, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engrain.export import export_merged
    from engrain.memory.registry import open_memory
    from engrain.train.loop import train

    train(ws, TrainConfig(memory="lora", max_steps=3, lora_rank=4, lr=5e-3, **FAST), str(tiny_model_dir),
          show_progress=False)
    out = tmp_path / "merged"
    export_merged(ws, "lora", out)
    merged = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == tiny_lm.tokenizer.chat_template
    ids = torch.tensor([[9, 8, 7, 6]])
    with torch.no_grad():
        want = open_memory("lora", ws, tiny_lm).lm.model(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-4)


def test_replay_mixes_cached_self_distillation(ws, tiny_model_dir, tiny_lm):
    from engrain.train.plan import make_plan
    from engrain.train.replay import replay_prompts

    cfg = TrainConfig(replay_share=0.25, replay_max_new_tokens=4, seq_len=128, val_fraction=0.0)
    plan = make_plan(ws, tiny_lm, cfg, world=1, packing=True)
    assert plan.n_synth == 24 and plan.n_replay == 8  # 25% of the mix
    cache = list((ws.root / "train" / "replay").glob("self-distill-*.jsonl"))
    assert len(cache) == 1
    rows = [json.loads(x) for x in cache[0].read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in rows] == replay_prompts()[:8]  # only the prompts the mix draws
    mtime = cache[0].stat().st_mtime_ns
    make_plan(ws, tiny_lm, cfg, world=1, packing=True)
    assert cache[0].stat().st_mtime_ns == mtime  # generated once


def test_self_prose_replay_is_half_the_replay_and_continues_the_shipped_openings(ws, tiny_lm):
    """Two replay sources share the replay equally; self-prose items are plain text (no chat template) that start
    with a shipped opening, under the replay's KL like the chat answers; every opening is continued at once, so the
    pool does not depend on how many a run draws."""
    from engrain.train.plan import make_plan
    from engrain.train.replay import replay_openings, replay_prompts

    cfg = TrainConfig(replay_share=0.25, replay_max_new_tokens=4, seq_len=128, val_fraction=0.0,
                      replay_sources=["self_distill", "self_prose"])
    plan = make_plan(ws, tiny_lm, cfg, world=1, packing=True)
    assert plan.n_synth == 24 and plan.n_replay == 8
    rows = [json.loads(x) for x in next((ws.root / "train" / "replay").glob("self-prose-*.jsonl")).read_text()
            .splitlines()]
    assert [r["opening"] for r in rows] == replay_openings()  # continued together, whatever the draw
    drawn = [ex.key for ex in plan.train if ex.kind == "replay"]
    assert sum(k.startswith("replay-sp-") for k in drawn) == sum(k.startswith("replay-sd-") for k in drawn) == 4
    assert all(r["text"].startswith(r["opening"]) and "messages" not in r for r in rows)
    chat = next((ws.root / "train" / "replay").glob("self-distill-*.jsonl")).read_text().splitlines()
    assert [json.loads(x)["messages"][0]["content"] for x in chat] == replay_prompts()[:4]


def test_replay_shares_split_the_replay_between_its_sources(ws, tiny_lm):
    """train.replay_shares weighs the sources; the counts add up to the replay asked, and shares that do not fit the
    sources are refused by name."""
    from engrain.train.plan import make_plan
    from engrain.train.replay import source_counts

    assert source_counts(10, ["a", "b"], None) == [5, 5]
    assert source_counts(9, ["a", "b"], None) == [5, 4]  # as the equal split always gave
    assert source_counts(10, ["a", "b"], [1, 2]) == [3, 7]
    assert source_counts(7, ["a", "b", "c"], [1, 0, 1]) == [4, 0, 3]
    cfg = TrainConfig(replay_share=0.25, replay_max_new_tokens=4, seq_len=128, val_fraction=0.0,
                      replay_sources=["self_distill", "self_prose"], replay_shares=[1, 3])
    drawn = [ex.key for ex in make_plan(ws, tiny_lm, cfg, world=1, packing=True).train if ex.kind == "replay"]
    assert sum(k.startswith("replay-sd-") for k in drawn) == 2 and sum(k.startswith("replay-sp-") for k in drawn) == 6
    for bad in ([1.0], [0, 0], [-1, 2]):
        with pytest.raises(EngrainError, match="replay_shares"):
            make_plan(ws, tiny_lm, cfg.model_copy(update={"replay_shares": bad}), world=1, packing=True)


def test_self_qa_replay_answers_the_shipped_short_questions(ws, tiny_lm):
    from engrain.train.plan import make_plan
    from engrain.train.replay import replay_questions

    cfg = TrainConfig(replay_share=0.25, replay_max_new_tokens=4, seq_len=128, val_fraction=0.0,
                      replay_sources=["self_distill", "self_qa"])
    plan = make_plan(ws, tiny_lm, cfg, world=1, packing=True)
    drawn = [ex.key for ex in plan.train if ex.kind == "replay"]
    assert plan.n_replay == 8 and sum(k.startswith("replay-qa-") for k in drawn) == 4
    rows = next((ws.root / "train" / "replay").glob("self-qa-*.jsonl")).read_text().splitlines()
    assert [json.loads(x)["messages"][0]["content"] for x in rows] == replay_questions()[:4]


def test_replay_refuses_the_text_forgetting_is_measured_on(ws, tiny_lm):
    from engrain.train.plan import make_plan

    cfg = TrainConfig(replay_share=0.25, seq_len=128, val_fraction=0.0, replay_sources=["general_text"])
    with pytest.raises(EngrainError, match="general_text.*forgetting"):
        make_plan(ws, tiny_lm, cfg, world=1, packing=True)


def test_replay_openings_and_prompts_stay_apart_from_what_forgetting_is_measured_on():
    """No opening names a topic of the measured general text, and no replay text holds a general question."""
    from engrain.evaluate.forgetting import general_questions, general_text
    from engrain.train.replay import replay_openings, replay_prompts

    titles = [p.strip().lower() for p in general_text().split("\n\n") if p.strip() and len(p.strip()) < 40]
    assert len(titles) >= 10
    for opening in replay_openings():
        assert not any(re.search(rf"\b{t.removeprefix('the ')}\b", opening.lower()) for t in titles), opening
    questions = {q.question.lower() for q in general_questions()}
    assert not questions & {p.lower() for p in replay_prompts() + replay_openings()}


def test_replay_questions_ask_neither_a_measured_fact_nor_in_a_measured_question_s_words():
    """The short questions of self-QA replay hold no measured question's content words and never begin with the
    four words one begins with, so what they keep of the general answers is measured, not rehearsed."""
    from engrain.evaluate.forgetting import general_questions
    from engrain.synth.text import normalize
    from engrain.train.replay import _content_words, asks_a_measured_question, replay_questions

    asked = replay_questions()
    assert len(asked) >= 150 and len({normalize(q) for q in asked}) == len(asked)
    measured = [_content_words(q.question) for q in general_questions()]
    heads = {tuple(normalize(q.question).split()[:4]) for q in general_questions()}
    for q in asked:
        assert q.endswith("?") and not asks_a_measured_question(q, measured), q
        assert tuple(normalize(q).split()[:4]) not in heads, q


def test_a_larger_replay_pool_answers_only_the_prompts_not_yet_answered(tmp_path, tiny_lm, monkeypatch):
    import engrain.models
    from engrain.train.replay import replay_prompts, self_distill_items

    ws = Workspace.at(tmp_path / "pool").ensure()
    few = self_distill_items(ws, tiny_lm, 4, n_prompts=3)
    asked: list[list[str]] = []
    real = engrain.models.answer
    monkeypatch.setattr(engrain.models, "answer",
                        lambda lm, prompts, **kw: asked.append(prompts) or real(lm, prompts, **kw))
    more = self_distill_items(ws, tiny_lm, 4, n_prompts=5)
    assert asked == [replay_prompts()[3:5]] and more[:3] == few
    assert [r["id"] for r in more] == [f"replay-sd-{i}" for i in range(5)]
    assert self_distill_items(ws, tiny_lm, 4, n_prompts=2) == few[:2] and len(asked) == 1  # a subset: nothing made


def test_replay_answers_of_a_model_engrain_keeps_are_shared_by_workspaces(tmp_path, tiny_model_dir, monkeypatch):
    """A new workspace on the embedded (or a fetched) model reuses the answers another workspace generated; a
    model from the user's own folder keeps them in its workspace only."""
    import shutil

    import engrain.models
    from engrain.models import load_model
    from engrain.train.replay import self_distill_items

    home = tmp_path / "home"
    monkeypatch.setenv("ENGRAIN_HOME", str(home))
    kept = home / "models" / "tiny"
    shutil.copytree(tiny_model_dir, kept)
    lm = load_model(str(kept), device="cpu")
    first = self_distill_items(Workspace.at(tmp_path / "one").ensure(), lm, 4, n_prompts=3)
    assert len(list((home / "replay").rglob("*.jsonl"))) == 1
    monkeypatch.setattr(engrain.models, "answer", lambda *a, **k: pytest.fail("answered again"))
    assert self_distill_items(Workspace.at(tmp_path / "two").ensure(), lm, 4, n_prompts=3) == first
    own = load_model(str(tiny_model_dir), device="cpu")
    monkeypatch.undo()
    monkeypatch.setenv("ENGRAIN_HOME", str(home))
    self_distill_items(Workspace.at(tmp_path / "three").ensure(), own, 4, n_prompts=2)
    assert len(list((home / "replay").rglob("*.jsonl"))) == 1  # the user's folder: nothing shared


def test_dry_run_reports_steps_tokens_time_and_memory(ws, tiny_model_dir):
    from engrain.train.loop import train

    report = train(ws, TrainConfig(memory="lora", **{**FAST, "epochs": 2.0}), str(tiny_model_dir),
                   dry_run=True, show_progress=False)
    assert report["dry_run"] and report["steps"] == 2 * report["steps_per_epoch"]
    assert report["total_tokens"] > 0 and report["estimated_seconds"] > 0
    assert report["predicted_peak_memory_mb"] > 0 and report["oom_risk"] is False
    assert not ws.memory_dir("lora").exists()


def test_cli_train_json_and_bad_data(ws, tiny_model_dir):
    import subprocess
    import sys

    cfg = {"train": {**FAST, "max_steps": 2, "lora_rank": 2}}
    import yaml

    ws.config_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "engrain.cli", "train", "-w", str(ws.root), "--memory", "lora",
           "--model", str(tiny_model_dir), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr  # a user's log shows engrain's progress, not libraries' warnings
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["out"].endswith("memories/lora")
    (ws.synth_dir / "zz.jsonl").write_text('{"oops": 1}\n')
    proc = subprocess.run(cmd + ["--force"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "zz.jsonl:1:" in proc.stderr.replace("\n", "")  # rich may wrap the message


def test_packed_attention_equals_the_block_diagonal_mask(tiny_lm):
    """Per-example attention blocks give the logits and gradients of transformers' own block-diagonal mask (the
    tiny model has grouped KV heads, like the embedded one)."""
    import torch

    from engrain.train.kernels.packed_attention import packed_rows

    model = tiny_lm.model
    torch.manual_seed(1)
    ids = torch.randint(5, 500, (2, 40))
    pos = torch.tensor([list(range(13)) + list(range(20)) + list(range(7)),
                        list(range(40))])

    def run(packed: bool):
        model.zero_grad()
        with packed_rows(model) if packed else contextlib.nullcontext():
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        (logits.float() ** 2).mean().backward()
        return logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    ref_logits, ref_grad = run(False)
    logits, grad = run(True)
    assert model.config._attn_implementation == "sdpa"  # restored
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert torch.allclose(grad, ref_grad, atol=1e-6, rtol=1e-4)
    # and the blocks really are separate: the second example alone gives the same logits as inside the row
    alone = model(input_ids=ids[:1, 13:33], use_cache=False).logits
    assert torch.allclose(alone[0], logits[0, 13:33], atol=1e-5)
    # In bf16 the short blocks take the plain matmul form: the same attention up to bf16 rounding
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_bf16, _ = run(False)
        bf16, _ = run(True)
    assert (bf16 - ref_bf16).abs().max() < 0.05 * ref_logits.abs().max()
    assert (bf16 - ref_logits).abs().max() < 0.05 * ref_logits.abs().max()


def test_self_questions_keep_short_ended_questions_and_never_a_measured_one(tmp_path, tiny_lm, monkeypatch):
    """The base model's own user turns become replay only when they ended on their own, fit on one line and ask a
    question; one holding every content word of a general question forgetting is measured on is dropped. Round r
    samples with seed r, and a cached pool grows by rounds without sampling the earlier ones again."""
    import engrain.models
    from engrain.models.generation import Generation
    from engrain.train import replay

    samples = {0: ["What is the capital of France?", "Why not?", "How do tides work?", "How do tides work?"],
               1: ["Which river is longest in Europe?", "What do owls eat at night?"],
               2: ["Why do cats purr when they are content?"]}
    seeds: list[int] = []

    def fake(lm, prompts, *, seed, max_new_tokens, **kw):
        seeds.append(seed)
        assert prompts[0].endswith("<|im_start|>user\n") and "Answer briefly" in prompts[0]
        out = [Generation(t, 1, 1, "stop") for t in samples[seed]]
        return out + [Generation("Tell me a story about a ship", 1, 1, "stop"),  # no question
                      Generation("What is the tallest tree in", 1, 1, "length"),  # cut off
                      Generation("Hi.\nWhat is love?", 1, 1, "stop")]  # two lines

    monkeypatch.setattr(engrain.models, "generate", fake)
    ws = Workspace.at(tmp_path / "w").ensure()
    assert replay.self_questions(ws, tiny_lm, 2) == ["How do tides work?", "Which river is longest in Europe?",
                                                      "What do owls eat at night?"]
    assert seeds == [0, 1]  # "Why not?" is under three words; France's capital is measured
    assert replay.self_questions(ws, tiny_lm, 4)[-1] == "Why do cats purr when they are content?"
    assert seeds == [0, 1, 2]
    assert replay.asks_a_measured_question("So, what is the capital city of France?",
                                           [replay._content_words("What is the capital of France?")])
    assert not replay.asks_a_measured_question("What is the capital of Peru?",
                                               [replay._content_words("What is the capital of France?")])


def test_null_space_projection_keeps_out_the_directions_the_general_inputs_use_most(tiny_lm):
    """Each layer's projection removes the top ``share`` of its input directions by the replay's energy: what it
    leaves of that energy is the smallest any projection of that rank leaves (the sum of the smallest eigenvalues)."""
    import copy

    import torch

    from engrain.memory.parametric import get_kind
    from engrain.train.null_space import general_projections, lora_layers

    module = get_kind("lora").attach(copy.deepcopy(tiny_lm.model), tiny_lm.tokenizer, {"lora_rank": 4}, None)
    examples = [tiny_lm.tokenizer(t).input_ids for t in ("The capital of France is Paris.",
                                                         "Water boils at a hundred degrees Celsius at sea level.",
                                                         "A hexagon has six sides and six corners.")]
    layers = lora_layers(module)
    inputs: dict[str, list] = {}
    handles = [layer.register_forward_pre_hook(lambda _m, args, n=name: inputs.setdefault(n, []).append(
        args[0].reshape(-1, args[0].shape[-1]))) for name, layer in layers.items()]
    projections = general_projections(module, examples, 0.5, "cpu")
    for h in handles:
        h.remove()
    assert set(projections) == set(layers) and len(layers) == 14  # 7 linear layers in each of 2 blocks
    for name, p in projections.items():
        x = torch.cat(inputs[name]).double()
        cov = x.T @ x
        dim = cov.shape[0]
        p = p.double()
        assert torch.allclose(p, p.T, atol=1e-5) and torch.allclose(p @ p, p, atol=1e-5)
        assert round(float(torch.trace(p))) == dim - round(0.5 * dim)
        smallest = torch.linalg.eigvalsh(cov)[:dim - round(0.5 * dim)].sum()
        assert float(torch.trace(p @ cov @ p)) == pytest.approx(float(smallest), rel=1e-3, abs=1e-6)


def test_relative_null_space_keeps_out_the_directions_general_inputs_use_and_documents_do_not():
    """Ranked by the replay's energy relative to the documents', the direction the documents never use goes first,
    though the replay uses another more."""
    import torch

    from engrain.train.null_space import projection_off_relative

    replay = torch.diag(torch.tensor([10.0, 1.0, 1.0, 1.0]))
    documents = torch.diag(torch.tensor([10.0, 1.0, 0.0, 1.0]))
    p = projection_off_relative(replay, documents, 0.25)
    assert torch.allclose(p, torch.diag(torch.tensor([1.0, 1.0, 0.0, 1.0])), atol=1e-5)


@pytest.mark.parametrize("relative", [False, True])
def test_a_null_space_lora_learns_only_outside_the_general_directions(ws, tiny_model_dir, tiny_lm, relative):
    """With train.lora_null_share the saved adapter's A rows lie in the allowed subspace (the projection leaves them
    as they are), B has moved, and the setting is refused where it cannot apply."""
    import copy

    import torch
    from safetensors.torch import load_file

    from engrain.memory.parametric import get_kind
    from engrain.train.loop import train, with_kind_defaults
    from engrain.train.null_space import general_projections
    from engrain.train.plan import make_plan

    fast = {**FAST, "replay_share": 0.25, "replay_max_new_tokens": 4, "replay_kl": 0.0}
    cfg = TrainConfig(memory="lora", max_steps=4, lora_rank=4, lr=5e-3, lora_null_share=0.5,
                      lora_null_relative=relative, bf16="off", **fast)
    train(ws, cfg, str(tiny_model_dir), show_progress=False)
    weights = load_file(str(ws.memory_dir("lora") / "adapter_model.safetensors"))
    plan = make_plan(ws, tiny_lm, with_kind_defaults(cfg, get_kind("lora")), world=1, packing=True)
    module = get_kind("lora").attach(copy.deepcopy(tiny_lm.model), tiny_lm.tokenizer, {"lora_rank": 4}, ws)
    documents = [ex.ids for ex in plan.train if ex.kind != "replay"] if relative else None
    projections = general_projections(module, [ex.ids for ex in plan.train if ex.kind == "replay"], 0.5, "cpu",
                                      documents=documents)
    checked = 0
    for name, p in projections.items():
        a = next(t for n, t in weights.items() if n.endswith(f"{name.removeprefix('base_model.')}.lora_A.weight"))
        assert a.abs().sum() > 0 and torch.allclose(a @ p, a, atol=1e-4)
        checked += 1
    assert checked == len(projections) and any(t.abs().sum() > 0 for n, t in weights.items() if "lora_B" in n)

    with pytest.raises(EngrainError, match="replay"):
        train(Workspace.at(ws.root), cfg.model_copy(update={"replay_share": 0.0}), str(tiny_model_dir),
              show_progress=False, force=True)
    with pytest.raises(EngrainError, match="lora_null_share"):
        train(Workspace.at(ws.root), cfg.model_copy(update={"memory": "full", "lr": 1e-5}), str(tiny_model_dir),
              show_progress=False, force=True)

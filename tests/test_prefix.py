"""The trained KV prefix: initialised from the corpus's real KV, equivalent to reading those tokens, trainable,
saved and loaded, refusing a model it does not fit, and usable through models.generate()."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from engrain.atomic import write_json, write_jsonl
from engrain.corpus.schema import Document
from engrain.errors import EngrainError
from engrain.memory.parametric import META_FILE, model_fingerprint
from engrain.memory.prefix import PrefixKind, PrefixLM, corpus_tokens, document_openings, kv_of_tokens
from engrain.models import LM, generate
from engrain.workspace import Workspace

DOCS = [
    "Veltrix Systems was founded by Mara Olsen in Tromsø in 1987. Its first product was a tide gauge.",
    "The Olsen tide gauge measured water levels every four minutes and sold 212 units in its first year.",
]


def make_workspace(tmp_path) -> Workspace:
    ws = Workspace.at(tmp_path / "ws").ensure()
    rows = [Document(id=f"d{i}", path=f"d{i}.txt", format="txt", text=t, sha256=str(i)).to_dict()
            for i, t in enumerate(DOCS)]
    write_jsonl(ws.documents_path, rows)
    return ws


def attach(lm, ws, length=12, **opts):
    cfg = {"options": {"prefix": {"length": length, **opts}}}
    return PrefixKind().attach(lm.model, lm.tokenizer, cfg, ws)


def save(module, folder, model):
    folder.mkdir(parents=True, exist_ok=True)
    PrefixKind().save(module, folder, {"base_model": "tiny"})
    write_json(folder / META_FILE, {"kind": "prefix", "base_model": "tiny", "base_fingerprint": model_fingerprint(model)})


def test_prefix_starts_as_the_models_kv_of_the_corpus(tiny_lm, tmp_path):
    ws = make_workspace(tmp_path)
    module = attach(tiny_lm, ws, length=12, init="corpus")
    ids = corpus_tokens(tiny_lm.tokenizer, DOCS, 12)
    assert len(ids) == 12 and ids == tiny_lm.tokenizer(DOCS[0], add_special_tokens=False)["input_ids"][:12]
    with torch.no_grad():
        cache = tiny_lm.model(input_ids=torch.tensor([ids]), use_cache=True).cache
    keys, values = module.prefix_kv()
    assert keys.shape == (2, 2, 12, 16)  # layers x kv heads x P x head dim of the tiny model
    for i, layer in enumerate(cache.layers):
        torch.testing.assert_close(keys[i], layer.keys[0])
        torch.testing.assert_close(values[i], layer.values[0])
    # The first token is the frozen attention sink; the rest is trained.
    assert module.sink_keys.shape[2] == 1 and module.keys.shape[2] == 11
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["keys", "values"]


def test_documents_init_reads_every_documents_opening(tiny_lm, tmp_path):
    tok = tiny_lm.tokenizer
    ids = document_openings(tok, DOCS, 12)
    first = tok(DOCS[0], add_special_tokens=False)["input_ids"]
    second = tok("\n\n" + DOCS[1], add_special_tokens=False)["input_ids"]
    assert ids == first[:8] + second[:4]  # at least 8 tokens of each document, cut to the prefix length
    assert document_openings(tok, DOCS, 40) == first[:20] + second[:20]
    module = attach(tiny_lm, make_workspace(tmp_path), length=12, init="documents")
    keys, _ = module.prefix_kv()
    torch.testing.assert_close(keys, kv_of_tokens(tiny_lm.model, ids)[0])


def test_corpus_prefix_is_the_same_as_reading_those_tokens(tiny_lm, tmp_path):
    """Logits with the prefix equal the model's logits on prefix tokens + input: positions and masks are right,
    for a plain row, for left-padded rows and for packed rows."""
    ws = make_workspace(tmp_path)
    module = attach(tiny_lm, ws, length=10, init="corpus")
    prefix_ids = corpus_tokens(tiny_lm.tokenizer, DOCS, 10)
    a = tiny_lm.tokenizer("Who founded Veltrix Systems?", add_special_tokens=False)["input_ids"]
    b = tiny_lm.tokenizer("Tide gauges", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref_a = tiny_lm.model(input_ids=torch.tensor([prefix_ids + a])).logits[0, 10:]
        ref_b = tiny_lm.model(input_ids=torch.tensor([prefix_ids + b])).logits[0, 10:]
        got_a = module(input_ids=torch.tensor([a])).logits[0]
        torch.testing.assert_close(got_a, ref_a, atol=1e-4, rtol=1e-4)
        # Left padding (as models.generate batches prompts).
        pad = len(a) - len(b)
        ids = torch.tensor([a, [0] * pad + b])
        mask = torch.tensor([[1] * len(a), [0] * pad + [1] * len(b)])
        got = module(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got[1, pad:], ref_b, atol=1e-4, rtol=1e-4)
        # Packed: two examples in one row, position ids restarting at 0 (how the trainer packs).
        packed = module(input_ids=torch.tensor([a + b]), attention_mask=None,
                        position_ids=torch.tensor([list(range(len(a))) + list(range(len(b)))])).logits[0]
        torch.testing.assert_close(packed[:len(a)], ref_a, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(packed[len(a):], ref_b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("one_call", [False, True], ids=["per-example", "one-masked-call"])
def test_packed_attention_with_a_prefix_equals_the_prefix_mask(tiny_lm, tmp_path, monkeypatch, one_call):
    """The trainer's packed attention (no mask; each example attends to the prefix and its own tokens) gives the
    logits and prefix gradients of the 4-D mask the prefix builds otherwise, on both of its paths: per example
    (CPU) and one masked call per row (GPU)."""
    from engrain.train.kernels import packed_attention
    from engrain.train.kernels.packed_attention import packed_rows

    monkeypatch.setattr(packed_attention, "use_one_call", lambda *args: one_call)
    module = attach(tiny_lm, make_workspace(tmp_path), length=10)
    torch.manual_seed(3)
    ids = torch.randint(5, 500, (2, 30))
    pos = torch.tensor([list(range(9)) + list(range(14)) + list(range(7)), list(range(30))])

    def run(packed: bool):
        module.zero_grad()
        with packed_rows(module) if packed else contextlib.nullcontext():
            logits = module(input_ids=ids, attention_mask=None, position_ids=pos).logits
        (logits.float() ** 2).mean().backward()
        return logits.detach(), module.keys.grad.clone(), module.values.grad.clone()

    ref = run(False)
    got = run(True)
    assert tiny_lm.model.config._attn_implementation == "sdpa"  # restored
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_generation_with_prefix_matches_reading_the_prefix_tokens(tiny_lm, tmp_path):
    ws = make_workspace(tmp_path)
    module = attach(tiny_lm, ws, length=10, init="corpus")
    prefix_ids = corpus_tokens(tiny_lm.tokenizer, DOCS, 10)
    tok = tiny_lm.tokenizer
    a = tok("Who founded Veltrix Systems? Answer:", add_special_tokens=False)["input_ids"]
    b = tok("Tide gauges measure", add_special_tokens=False)["input_ids"]
    pad = len(a) - len(b)
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    out = module.generate(input_ids=torch.tensor([a, [tok.pad_token_id] * pad + b]),
                          attention_mask=torch.tensor([[1] * len(a), [0] * pad + [1] * len(b)]), **kw)
    for row, prompt in enumerate([a, b]):
        ids = torch.tensor([prefix_ids + prompt])
        ref = tiny_lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        assert out[row, len(a):].tolist() == ref[0, ids.shape[1]:].tolist()
    # Through models.generate (what every memory answers with): runs, and the prefix changes the answer.
    with_prefix = LM(model=module, tokenizer=tok, name="tiny+prefix", path="", device="cpu")
    prompts = ["Who founded Veltrix Systems? Answer:", "Tide gauges measure"]
    got = generate(with_prefix, prompts, max_new_tokens=8)
    direct = module.generate(input_ids=torch.tensor([a]), attention_mask=torch.ones(1, len(a), dtype=torch.long),
                             max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert got[0].completion_tokens > 0
    assert got[0].text == tok.decode(direct[0, len(a):len(a) + got[0].completion_tokens], skip_special_tokens=True).strip()


def test_training_moves_only_the_prefix_and_lowers_loss(tiny_lm, tmp_path):
    ws = make_workspace(tmp_path)
    module = attach(tiny_lm, ws, length=8)
    base_before = {n: p.clone() for n, p in tiny_lm.model.named_parameters()}
    sink_before = module.sink_keys.clone()
    ids = torch.tensor(tiny_lm.tokenizer(["Mara Olsen founded Veltrix Systems in Tromsø in 1987."] * 2,
                                         add_special_tokens=False)["input_ids"])
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=0.3)
    losses = []
    for _ in range(8):
        loss = module(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in tiny_lm.model.parameters())
        opt.step()
        losses.append(loss.item())
    # A random 2-layer model lets a prefix move its loss only a little; no gradient would move it not at all.
    assert losses[-1] < losses[0] - 0.1
    for n, p in tiny_lm.model.named_parameters():
        assert torch.equal(p, base_before[n]), n
    assert torch.equal(module.sink_keys, sink_before)


def test_save_load_round_trip_and_mismatch(tiny_lm, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    ws = make_workspace(tmp_path)
    module = attach(tiny_lm, ws, length=8)
    with torch.no_grad():
        module.keys.add_(0.1)  # as if trained: saved tensors must not just be the re-computable init
    folder = ws.memory_dir("prefix")
    save(module, folder, tiny_lm.model)
    assert (folder / "prefix.safetensors").is_file() and (folder / "prefix_config.json").is_file()

    loaded = PrefixKind().load(copy.deepcopy(tiny_lm.model), tiny_lm.tokenizer, folder)
    ids = torch.tensor([tiny_lm.tokenizer("Who founded Veltrix?", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, module(input_ids=ids).logits, atol=0, rtol=0)

    cfg = tiny_lm.model.config.to_dict()
    cfg.update(num_hidden_layers=3)
    other = LlamaForCausalLM(LlamaConfig(**cfg))
    with pytest.raises(EngrainError, match="does not match"):
        PrefixKind().load(other, tiny_lm.tokenizer, folder)
    # Without the trainer's fingerprint, the tensors' own shape still catches it.
    (folder / META_FILE).write_text('{"kind": "prefix"}')
    with pytest.raises(EngrainError, match="trained for a model"):
        PrefixKind().load(other, tiny_lm.tokenizer, folder)


def test_bad_options_and_empty_corpus(tiny_lm, tmp_path):
    ws = make_workspace(tmp_path)
    with pytest.raises(EngrainError, match="length"):
        attach(tiny_lm, ws, length=1)
    with pytest.raises(EngrainError, match="init"):
        attach(tiny_lm, ws, init="zeros")
    with pytest.raises(EngrainError, match="Unknown prefix option"):
        attach(tiny_lm, ws, lenght=3)
    with pytest.raises(EngrainError, match="prefix.length must be an integer"):
        attach(tiny_lm, ws, length="long")
    write_jsonl(ws.documents_path, [])
    with pytest.raises(EngrainError, match="no text"):
        attach(tiny_lm, ws)
    with pytest.raises(EngrainError, match="no workspace"):
        PrefixKind().attach(tiny_lm.model, tiny_lm.tokenizer, {}, None)
    module = attach(tiny_lm, ws, length=6, init="random_tokens")
    assert isinstance(module, PrefixLM) and module.prefix_length == 6


def test_trains_through_the_trainer_and_answers_as_a_memory(tmp_path, tiny_model_dir, tiny_lm):
    """`engrain train --memory prefix` and `engrain ask --memory prefix` go through the registry to this kind."""
    from engrain.config import TrainConfig
    from engrain.memory.registry import open_memory
    from engrain.train.loop import train

    ws = make_workspace(tmp_path)
    ws.synth_dir.mkdir(parents=True)
    items = [{"id": f"t{i}", "strategy": "facts", "text": DOCS[i % 2]} for i in range(6)]
    write_jsonl(ws.synth_dir / "facts.jsonl", items)
    cfg = TrainConfig(memory="prefix", max_steps=3, seq_len=64, micro_batch=2, eval_every=0, save_every=0,
                      replay_share=0.0, options={"prefix": {"length": 8}})
    summary = train(ws, cfg, str(tiny_model_dir), show_progress=False)
    assert summary["steps"] == 3 and summary["trainable_params"] == 2 * 2 * 2 * 7 * 16  # K+V, layers, heads, P-1, dim
    mem = open_memory("prefix", ws, tiny_lm)
    init = PrefixKind().attach(copy.deepcopy(tiny_lm.model), tiny_lm.tokenizer, cfg.model_dump(), ws)
    assert not torch.equal(mem.lm.model.keys, init.keys)  # trained away from the corpus KV it started at
    assert mem.answer(["Who founded Veltrix Systems?"], max_new_tokens=4)[0].prompt_tokens > 0
    from engrain.models import load_model

    bf16 = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")  # what answers where bf16 is native
    assert open_memory("prefix", ws, bf16).answer(["Who founded Veltrix Systems?"], max_new_tokens=4)[0].text is not None


def test_fast_loop_answers_a_prefix_memory_as_generate_does(tiny_lm, tmp_path, monkeypatch):
    """A trained KV prefix decodes through the lean loop (its KV shared by every row, not copied per row) with the
    greedy tokens of the wrapper's own generate()."""
    from engrain.models import fastgen

    module = attach(tiny_lm, make_workspace(tmp_path), length=10, init="corpus")
    lm = LM(model=module, tokenizer=tiny_lm.tokenizer, name="tiny+prefix", path="", device="cpu")
    assert fastgen.supports(module) and fastgen.trained_prefix(module)[0][0].shape[2] == module.prefix_length
    prompts = ["Who founded Veltrix Systems? Answer:", "Tide gauges measure", "Hi", "The harbour was dredged in"]
    monkeypatch.setenv("ENGRAIN_FASTGEN", "0")
    plain = generate(lm, prompts, max_new_tokens=10, batch_size=2)
    monkeypatch.setenv("ENGRAIN_FASTGEN", "1")
    fast = generate(lm, prompts, max_new_tokens=10, batch_size=2)
    assert [(g.text, g.completion_tokens) for g in fast] == [(g.text, g.completion_tokens) for g in plain]

"""The default training recipe's parts: augmented fact items grounded in their source, whole facts held out for
validation, the KL to the base model on replay, and the checkpoint chosen by held-out facts answered."""

from __future__ import annotations

import json
import shutil

import pytest
from synth_workspace import DOCS

from engrain.config import TrainConfig
from engrain.corpus.schema import Chunk, Document
from engrain.synth import facts
from engrain.synth.base import Unit, document_subject
from engrain.synth.grounding import SourceIndex, check
from engrain.workspace import Workspace

PEOPLE = ("# Leadership team\n\n**Teodora Blasko, Chief Executive.** Teodora came to Kelderwick Marine Sensors in "
          "2014 to build its sales team. She took over as chief executive in 2021. Her boat is called Maudlin.\n\n"
          "**Ruben Castellane, Chief Technology Officer.** Ruben has led engineering since 2018. His doctorate is "
          "from the University of Tallowmere.")


def _unit(doc_id: str, text: str | None = None, title: str | None = None) -> Unit:
    if text is None:
        title, text = DOCS[doc_id]
    doc = Document(id=doc_id, path=f"{doc_id}.txt", format="txt", text=text, sha256="d", title=title or doc_id)
    chunk = Chunk(id=f"{doc_id}#0", doc_id=doc_id, text=text, start=0, end=len(text), sha256=f"sha-{doc_id}")
    return Unit(chunk, doc, document_subject(doc, chunk))


def test_statements_name_people_in_full_and_stay_grounded():
    unit = _unit("people", PEOPLE, "Leadership team")
    texts = [c.text for c in facts.candidates(unit, limit=0, orders=2) if c.text is not None]
    joined = "\n".join(texts)
    assert "Teodora Blasko came to Kelderwick Marine Sensors in 2014" in joined
    assert "Teodora Blasko took over as chief executive in 2021." in joined
    assert "Teodora Blasko's boat is called Maudlin." in joined
    assert "Ruben Castellane's doctorate is from the University of Tallowmere." in joined
    assert "Ruben Castellane has led engineering since 2018." in joined
    # A heading stays out of the sentence below it.
    assert not any("Leadership team **Teodora" in t or "team Teodora" in t for t in texts)
    source = SourceIndex(unit.chunk.text)
    for t in texts:  # every name and number in an item is the source's
        assert check(t, source, strictness="strict", min_words=1).reason not in {"ungrounded-name",
                                                                                 "ungrounded-number"}, t


def test_shuffled_orders_hold_the_same_statements_in_other_orders():
    unit = _unit("orvik-observatory")
    cands = facts.candidates(unit, limit=0, orders=3)
    statements = [c.text for c in cands if c.variant.startswith("s")]
    orders = [c.text for c in cands if c.variant.startswith("o")]
    assert [c.variant for c in cands if c.variant == "d"] == ["d"]
    assert len(orders) == 3 and len(set(orders)) == 3 and " ".join(statements) not in orders
    for text in orders:
        assert sorted(s for s in statements if s in text) == sorted(statements)
        assert len(text) == len(" ".join(statements))
    assert orders == [c.text for c in facts.candidates(unit, limit=0, orders=3) if c.variant.startswith("o")]
    assert not [c for c in facts.candidates(unit, limit=0, orders=0) if c.variant[0] in "do"]


def test_a_small_cap_asks_about_every_sentence_first():
    unit = _unit("orvik-observatory")
    everything = facts.candidates(unit, limit=500)
    asked_sentences = {facts.fact_of(c.variant) for c in everything if facts.is_question(c.variant)}
    capped = facts.candidates(unit, limit=len(asked_sentences))
    questions = [c for c in capped if c.variant[0] in "ckqr"]
    assert {facts.fact_of(c.variant) for c in questions} == asked_sentences
    assert [c for c in capped if c.variant.startswith("s")] == [c for c in everything if c.variant.startswith("s")]


def test_fact_of_and_is_question():
    assert facts.fact_of("k3.1w2") == "3" and facts.is_question("k3.1w2")
    assert facts.fact_of("s12") == "12" and not facts.is_question("s12")
    assert facts.fact_of("r2.0") == "2" and not facts.is_question("r2.0") and facts.is_question("q2.0")
    assert facts.fact_of("o1") is None and facts.fact_of("d") is None and facts.fact_of("x") is None
    assert facts.fact_of("a4") == facts.fact_of("b4") == "4" and facts.is_question("a4") and not facts.is_question("b4")


def _facts_items(n_sentences: int = 40) -> list[tuple[str, dict]]:
    rows = []
    for i in range(n_sentences):
        for variant, body in ((f"s{i}", {"text": f"Fact {i} is {i * 7}."}),
                              (f"r{i}.0", {"text": f"{i * 7} is fact {i}."}),
                              (f"k{i}.0", {"messages": [{"role": "user", "content": f"Complete: Fact {i} is"},
                                                        {"role": "assistant", "content": f"{i * 7}."}]}),
                              (f"k{i}.0w1", {"messages": [{"role": "user", "content": f"Finish: Fact {i} is"},
                                                          {"role": "assistant", "content": f"{i * 7}."}]}),
                              (f"c{i}.0", {"messages": [{"role": "user", "content": f"Fill: Fact {i} is ____."},
                                                        {"role": "assistant", "content": f"{i * 7}"}]})):
            rows.append((f"facts-{i}-{variant}", {"strategy": "facts", "variant": variant,
                                                  "chunk_sha256": [f"chunk{i // 5}"], **body}))
    rows.append(("facts-o0", {"strategy": "facts", "variant": "o0", "chunk_sha256": ["chunk0"], "text": "All."}))
    return rows


def test_validation_holds_out_whole_facts_and_keeps_their_statements(tokenizer):
    from engrain.train.data import encode_item, fact_group, split_examples

    items = _facts_items()
    examples = [encode_item(tokenizer, item, key) for key, item in items]
    train, val = split_examples(examples, dict(items), fraction=0.2, max_val=1000)
    assert val, "some facts are held out"
    groups = {e.key: fact_group(e.key, dict(items)[e.key]) for e in examples}
    held = {groups[e.key][0] for e in val}
    for e in train:  # no question about a held-out fact is trained, in any wording; its statements are
        group, asks = groups[e.key]
        assert not (group in held and asks), e.key
    for group in held:
        keys = [k for k, (g, _) in groups.items() if g == group]
        assert sum(1 for k in keys if k in {e.key for e in val}) == 3  # k, its other wording, and c
        assert sum(1 for k in keys if k in {e.key for e in train}) == 2  # s and r stay in training
    # Stable, and capped by whole facts.
    again = split_examples(examples, dict(items), fraction=0.2, max_val=1000)[1]
    assert [e.key for e in again] == [e.key for e in val]
    capped = split_examples(examples, dict(items), fraction=0.2, max_val=4)[1]
    assert 1 <= len(capped) <= 4 and len(capped) % 3 == 0


def test_replay_kl_weight_mixes_the_base_distribution_into_the_loss(tiny_lm):
    """Each example's teacher weight decides its positions' mix: 0 the next-token loss alone, 1 the teacher's
    top-k alone, per example within one packed batch."""
    import torch

    from engrain.train.distill import Teacher, self_targets
    from engrain.train.data import IGNORE, encode_item
    from engrain.train.packing import collate, loss_sum, pack

    tok = tiny_lm.tokenizer
    ex = encode_item(tok, {"messages": [{"role": "user", "content": "Name a colour."},
                                        {"role": "assistant", "content": "Blue, like the sea."}]}, "r1", "replay")
    [target] = self_targets(tiny_lm, [ex], top_k=8, ignore=IGNORE)
    n = sum(1 for x in ex.labels if x != IGNORE)
    assert isinstance(target, Teacher) and len(target.ids) == n and len(target.ids[0]) == 8
    with torch.no_grad():  # the teacher is the model's own top-k at each answer position
        logits = tiny_lm.model(input_ids=torch.tensor([ex.ids])).logits[0]
    j = next(i for i, x in enumerate(ex.labels) if x != IGNORE)
    assert target.ids[0][0] == int(logits[j - 1].argmax())

    def loss(weight: float) -> float:
        ex.teacher, ex.teacher_weight = target, weight
        with torch.no_grad():
            return float(loss_sum(tiny_lm.model, collate(pack([ex], 256), tok.pad_token_id, True, "cpu"), True,
                                  1.0)[0])

    hard, soft, half = loss(0.0), loss(1.0), loss(0.5)
    assert hard != pytest.approx(soft)
    assert half == pytest.approx((hard + soft) / 2, rel=1e-4)
    ex.teacher_weight = 0.0
    with torch.no_grad():
        plain = float(loss_sum(tiny_lm.model, collate(pack([ex], 256), tok.pad_token_id, True, "cpu"), True)[0])
    assert plain == pytest.approx(hard, rel=1e-5)


def test_replay_targets_run_in_batches_equal_one_example_at_a_time(tiny_lm):
    """self_targets batches examples by length with their shared template start run once: in fp32 each example's
    targets are those of its own forward; a repeated example is run once and an example without one loss tail has
    none."""
    from engrain.train.data import IGNORE, Example, encode_item
    from engrain.train.distill import _run_group, first_loss_index, self_targets

    tok = tiny_lm.tokenizer
    asks = ["Name a colour.", "What is two plus two? Answer in a word.", "Say hello.",
            "Write one short sentence about the moon and the tides."]
    examples = [encode_item(tok, {"messages": [{"role": "user", "content": q},
                                               {"role": "assistant", "content": f"An answer to: {q}"}]},
                            f"r{i}", "replay") for i, q in enumerate(asks)]
    examples.append(encode_item(tok, {"messages": [{"role": "user", "content": asks[1]},
                                                   {"role": "assistant", "content": f"An answer to: {asks[1]}"}]},
                                "again", "replay"))
    examples.append(Example([1, 2, 3], [IGNORE, IGNORE, IGNORE], "none", "replay"))
    got = self_targets(tiny_lm, examples, top_k=4, ignore=IGNORE)
    assert got[-1] is None and got[4].ids == got[1].ids
    for ex, target in zip(examples[:4], got):
        j = first_loss_index(ex.labels, IGNORE)
        [alone] = _run_group(tiny_lm.model, [(ex.key, ex.ids[:j], ex.ids[j:])], 4, tok.pad_token_id)
        assert target.ids == alone.ids
        assert max(abs(a - b) for ra, rb in zip(target.logprobs, alone.logprobs) for a, b in zip(ra, rb)) < 1e-3


def test_held_out_answers_are_greedy_decoding_read_from_the_validation_forward(tiny_lm, monkeypatch):
    import torch

    from engrain.models import chat_messages, chat_prompt, end_of_turn
    from engrain.train import validation
    from engrain.train.data import IGNORE, Example, encode_item
    from engrain.train.distill import first_loss_index
    from engrain.train.packing import collate, loss_sum, pack
    from engrain.train.validation import evaluate

    tok = tiny_lm.tokenizer
    prompt = tok(chat_prompt(tok, chat_messages("Which vault holds the charter?")), add_special_tokens=False)
    ids = list(prompt["input_ids"])
    with torch.no_grad():  # the model's own greedy answer, token by token
        for _ in range(3):
            ids.append(int(tiny_lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    end = tok(end_of_turn(tok), add_special_tokens=False)["input_ids"]
    n = len(prompt["input_ids"])

    def example(answer: list[int], key: str) -> Example:
        return Example(ids[:n] + answer + end, [IGNORE] * n + answer + end, key)

    # The tiny model's greedy tokens repeat the prompt's, which answer_positions leaves unjudged (its own test below):
    # here every answer token is judged, to test how they are read from the forward.
    def every_answer_token(ex, n_end, seq_len):
        j = first_loss_index(ex.labels, IGNORE)
        stop = len(ex.ids) - n_end
        return list(range(j, stop)) if j and j > 1 and stop <= seq_len else None  # a text item asks nothing

    monkeypatch.setattr(validation, "answer_positions", every_answer_token)
    right = example(ids[n:], "right")
    wrong = example(ids[n:-1] + [(ids[-1] + 1) % len(tok)], "wrong")
    text_only = encode_item(tok, {"text": "A statement, not a question."}, "t")

    def judge(examples: list[Example], packing: bool, micro_batch: int = 2, seq_len: int = 256):
        return evaluate(tiny_lm.model, examples, tok, micro_batch=micro_batch, seq_len=seq_len, packing=packing,
                        device="cpu")

    for packing in (True, False):
        assert judge([right], packing)[1] == [True]
        # packed behind a statement and a wrong answer in one row, or one per row: each question judged on its own
        assert judge([text_only, wrong, right], packing)[1] == [False, True]
        assert judge([text_only], packing)[1] is None
    examples = [right, text_only, wrong]
    rows = pack(examples, 256)
    with torch.no_grad():
        s, count = loss_sum(tiny_lm.model, collate(rows, tok.pad_token_id, True, "cpu"), True)
    assert judge(examples, True, micro_batch=1)[0] == pytest.approx(float(s) / count, rel=1e-4)
    # an answer cut off by the row length is not judged
    assert judge([right], True, seq_len=n + 2)[1] is None


def test_a_held_out_answer_is_judged_on_the_tokens_its_question_does_not_hold():
    from engrain.train.data import IGNORE, Example
    from engrain.train.validation import ANSWER_HEAD, answer_positions

    def example(question: list[int], answer: list[int], end: int = 99) -> Example:
        return Example(question + answer + [end], [IGNORE] * len(question) + answer + [end], "k")

    question = [5, 6, 7, 8]  # "When was the pier rebuilt?"
    # "The pier was rebuilt in 1987.": the restated words are not judged, the year is
    assert answer_positions(example(question, [6, 7, 40, 41, 8]), 1, 256) == [6, 7]
    assert answer_positions(example(question, [6, 7, 8]), 1, 256) is None  # the question holds the whole answer
    assert answer_positions(example(question, [40, 41]), 1, 5) is None  # the judged tokens are cut off
    long = answer_positions(example(question, list(range(100, 120))), 1, 256)
    assert long == list(range(4, 4 + ANSWER_HEAD))  # the fact's first tokens, not a long completion's tail
    assert answer_positions(Example([1, 2], [IGNORE, IGNORE], "none"), 1, 256) is None  # asks nothing


def test_training_keeps_the_checkpoint_that_answers_held_out_facts_best(tmp_path, tiny_model_dir):
    from engrain.train.loop import train

    ws = Workspace.at(tmp_path / "ws")
    ws.synth_dir.mkdir(parents=True)
    (ws.synth_dir / "facts.jsonl").write_text("".join(json.dumps({"id": k, **v}) + "\n" for k, v in _facts_items()))
    cfg = TrainConfig(memory="lora", max_steps=6, lora_rank=4, lr=5e-3, seq_len=128, micro_batch=2, eval_every=2,
                      save_every=0, replay_share=0.0, val_fraction=0.2, val_max=12)
    summary = train(ws, cfg, str(tiny_model_dir), show_progress=False)
    log = [json.loads(x) for x in (ws.root / "train" / "lora" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6] and all("val_answered" in r for r in evals)
    best = max(evals, key=lambda r: (r["val_answered"], -r["val_loss"]))
    assert summary["best_val_step"] == best["step"] and summary["kept_weights_of_step"] == best["step"]
    assert summary["data"]["validation"] >= 3
    # keep_best_p 0: no lead is beyond it, so the last step is kept whatever the evaluations counted
    strict = Workspace.at(tmp_path / "strict")
    shutil.copytree(ws.synth_dir, strict.synth_dir)
    summary = train(strict, cfg.model_copy(update={"keep_best_p": 0.0}), str(tiny_model_dir), show_progress=False)
    won, lost = summary["best_over_last"]
    assert summary["kept_weights_of_step"] == summary["steps"] == 6 and won >= lost


def test_an_earlier_checkpoint_replaces_the_last_only_on_a_lead_beyond_noise():
    from engrain.train.loop import beyond_noise, lead

    last = [True, False, False, True, False, False, False, False]
    one_ahead = [True, True, False, True, False, False, False, False]
    assert lead(one_ahead, last) == (1, 0)
    assert beyond_noise(lead(one_ahead, last), None)  # no threshold: any lead, as the evaluations were judged
    assert not beyond_noise(lead(one_ahead, last), 0.05)  # one question is noise
    assert lead([True] * 8, last) == (6, 0) and beyond_noise(lead([True] * 8, last), 0.05)  # McNemar p 1/32
    assert not beyond_noise(lead(last, last), 1.0)  # a tie is no lead
    assert not beyond_noise(lead(last, [True] * 8), 1.0)  # behind is no lead
    assert lead(None, last) is None and beyond_noise(None, 0.05)  # nothing to compare: the judgement stands


def test_experiment_settings_merge_into_the_workspace_config(tmp_path):
    """`engrain compare --config FILE`: a committed partial engrain.yaml sets a workspace up; bad fields are named."""
    from engrain.config import EngrainConfig, apply_settings, load_config, save_config
    from engrain.errors import EngrainError

    path = tmp_path / "engrain.yaml"
    start = EngrainConfig()
    start.rag.top_k = 7
    save_config(start, path)
    settings = tmp_path / "exp.yaml"
    settings.write_text("train:\n  epochs: 5\n  replay_kl: 0.5\nsynth:\n  facts_orders: 0\n")
    merged = apply_settings(path, settings)
    assert (merged.train.epochs, merged.train.replay_kl, merged.synth.facts_orders) == (5.0, 0.5, 0)
    assert merged.rag.top_k == 7 and merged.train.lora_rank == start.train.lora_rank  # the rest is kept
    assert load_config(path) == merged
    settings.write_text("train:\n  epochz: 5\n")
    with pytest.raises(EngrainError, match=r"exp.yaml: invalid settings: train.epochz"):
        apply_settings(path, settings)
    with pytest.raises(EngrainError, match="no such settings file"):
        apply_settings(path, tmp_path / "missing.yaml")


def test_replay_prompts_never_ask_the_forgetting_probe():
    """Replay keeps the base model's own answers to general requests; the forgetting probe must stay unseen."""
    from engrain.evaluate.forgetting import general_questions
    from engrain.evaluate.metrics import normalize
    from engrain.train.replay import replay_prompts

    probe = {normalize(q.question) for q in general_questions()}
    prompts = replay_prompts()
    assert len(prompts) > 100 and not [p for p in prompts if normalize(p) in probe]


def test_fact_weight_falls_on_the_facts_an_answer_states_not_on_what_its_question_holds(tokenizer):
    """train.fact_weight: the answer tokens of a name, number or date the question does not hold take that weight
    (every occurrence, in chat and text items alike); the prompt, the restated words and the copied name take 1."""
    from engrain.synth.text import fact_spans
    from engrain.train.data import IGNORE, encode_item

    answer = "The Orvane archive was founded in 1962 by Ada Varnholt, who ran it until 1980."
    assert [answer[a:b] for a, b in fact_spans(answer, "When was the Orvane archive founded?")] == [
        "1962", "Ada Varnholt", "1980"]
    vault = "Vault 19 opened."
    assert [vault[a:b] for a, b in fact_spans(vault, "It opened in 1962.")] == ["19"]  # whole numbers, not digits

    item = {"messages": [{"role": "user", "content": "When was the Orvane archive founded?"},
                         {"role": "assistant", "content": answer}]}
    ex = encode_item(tokenizer, item, "k", fact_weight=3.0)
    heavy = tokenizer.decode([t for t, w in zip(ex.ids, ex.weights) if w == 3.0])
    assert heavy.replace(" ", "") == "1962AdaVarnholt1980"
    assert all(w == 1.0 for w, lab in zip(ex.weights, ex.labels) if lab == IGNORE)  # no weight off the answer
    assert encode_item(tokenizer, item, "k").weights is None  # the default: every token alike
    assert fact_spans("Pellmouth.", "Which town?") == [(0, 9)]  # a one-word answer is a fact, not a sentence opening
    town = encode_item(tokenizer, {"messages": [{"role": "user", "content": "Which town?"},
                                                {"role": "assistant", "content": "Pellmouth"}]}, "p", fact_weight=3.0)
    assert tokenizer.decode([t for t, w in zip(town.ids, town.weights) if w == 3.0]) == "Pellmouth"

    text = encode_item(tokenizer, {"text": "Ada Varnholt ran the archive. Ada Varnholt retired in 1980."}, "t",
                       fact_weight=2.0)
    assert len(text.weights) == len(text.ids)
    assert tokenizer.decode([t for t, w in zip(text.ids, text.weights) if w == 2.0]).replace(" ", "") == (
        "AdaVarnholtAdaVarnholt1980")

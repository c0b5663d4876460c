"""Synthetic items as training examples: every ``WS/synth/*.jsonl`` line becomes token ids and labels.

Chat items ({"messages": [...]}) are rendered with ``models.chat_prompt``, the template ``answer()`` uses at inference,
and take loss on the final assistant answer only; text items ({"text": ...}) take next-token loss on every token.
An open-book item also carries ``context`` ([{"chunk_id", "text"}, ...]): the chunks go in front exactly as ``rag``
shows them (labelled inside the question of a chat item, plain texts before a text item) and take no loss.
Validation holds out whole facts (``fact_group``): every wording of a held-out fact's questions stays out of training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..errors import EngrainError
from ..jsonl import read_jsonl
from ..models import (DEFAULT_SYSTEM, chat_messages, chat_prompt, context_question, continuation_prompt, end_of_turn,
                      plain_chunks, render_chunks)
from ..workspace import Workspace

IGNORE = -100


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken
    key: str  # stable identity (item id or file:line): decides the validation split
    kind: str = "synth"  # "synth" or "replay"
    teacher: object | None = None  # distill.Teacher: the teacher's top-k at each loss position
    teacher_weight: float = 0.0  # share of the loss matched to the teacher (train.distill, or train.replay_kl)
    hidden_weight: float = 0.0  # weight of matching the teacher's hidden states (train.distill_hidden)
    weights: list[float] | None = None  # each label's loss weight (train.fact_weight); None: all 1

    @property
    def n_loss(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def render_messages(tokenizer, messages: list[dict], context: list[dict] | None = None) -> tuple[str, str]:
    """(prompt text, answer text) for a chat item: the prompt is exactly what ``models.answer`` feeds the model
    for the same question (same template, same default system message), the answer ends with the end of turn.
    With ``context`` (an open-book item) the last question is asked with those chunks in view, as ``rag`` asks."""
    prompt_msgs = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    if context:
        chunks = render_chunks([(c["chunk_id"], c["text"]) for c in context])
        prompt_msgs[-1]["content"] = context_question(prompt_msgs[-1]["content"], chunks)
    if prompt_msgs[0]["role"] != "system":
        # chat_messages() adds the default system message at inference; training must see the same prompt.
        prompt_msgs = chat_messages("", system=DEFAULT_SYSTEM)[:1] + prompt_msgs
    prompt = chat_prompt(tokenizer, prompt_msgs, add_generation_prompt=True)
    return prompt, messages[-1]["content"].strip() + end_of_turn(tokenizer)


def _check_item(item, where: str) -> None:
    """Raise EngrainError naming file:line when an item is neither a chat item nor a text item."""
    if not isinstance(item, dict):
        raise EngrainError(f"{where}: expected a JSON object, got {type(item).__name__}.",
                           hint='Each line must be {"messages": [...]} or {"text": "..."}.')
    if "messages" in item:
        msgs = item["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise EngrainError(f"{where}: 'messages' must be a list of at least a user and an assistant message.")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise EngrainError(f"{where}: messages[{j}] must be an object with string 'role' and 'content'.")
            if m["role"] not in ("system", "user", "assistant"):
                raise EngrainError(f"{where}: messages[{j}].role is '{m['role']}'; use system, user or assistant.")
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            raise EngrainError(f"{where}: the last message must be a non-empty assistant answer (the loss is on it).")
        if not any(m["role"] == "user" for m in msgs[:-1]):
            raise EngrainError(f"{where}: no user message before the assistant answer.")
    elif "text" in item:
        if not isinstance(item["text"], str) or not item["text"].strip():
            raise EngrainError(f"{where}: 'text' must be a non-empty string.")
    else:
        raise EngrainError(f"{where}: the item has neither 'messages' nor 'text'.",
                           hint='Each line must be {"messages": [...]} or {"text": "..."} (plus provenance fields).')
    context = item.get("context")
    if context is not None and not (isinstance(context, list) and all(
            isinstance(c, dict) and isinstance(c.get("chunk_id"), str) and isinstance(c.get("text"), str)
            for c in context)):
        raise EngrainError(f"{where}: 'context' must be a list of objects with string 'chunk_id' and 'text'.",
                           hint="Fix or delete that line, or regenerate the file with engrain synth.")


def _encode(tokenizer, text: str, fact_weight: float, stated: str = "",
            known: str = "") -> tuple[list[int], list[float] | None]:
    """(token ids of ``text``, each token's loss weight or None where ``fact_weight`` is 1). The weight falls on the
    tokens overlapping a fact ``stated`` (the start of ``text`` the facts are looked for in, all of it when empty)
    gives that ``known`` (the prompt) does not hold (``synth.text.fact_spans``); the rest weigh 1."""
    if fact_weight == 1.0:
        return tokenizer(text, add_special_tokens=False)["input_ids"], None
    from ..synth.text import fact_spans

    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = fact_spans(stated or text, known)
    return enc["input_ids"], [fact_weight if any(a < e and b > s for s, e in spans) else 1.0
                              for a, b in enc["offset_mapping"]]


def _after(prompt: list[int], weights: list[float] | None) -> list[float] | None:
    """The weights of a sequence whose ``prompt`` (weight 1) comes before the weighted tokens."""
    return None if weights is None else [1.0] * len(prompt) + weights


def encode_item(tokenizer, item: dict, key: str, kind: str = "synth", end_loss: bool = True,
                fact_weight: float = 1.0) -> Example:
    """Token ids and labels of one (already checked) item. ``end_loss`` False: no loss on a chat answer's end of
    turn, so the item teaches its answer but not where answers stop (``train.item_end_loss``). ``fact_weight``
    weighs the loss on the answer's fact tokens (``train.fact_weight``)."""
    if "messages" in item:
        prompt, answer = render_messages(tokenizer, item["messages"], item.get("context"))
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        # facts are looked for in the answer without its end of turn, so a one-word answer is the whole answer
        a, weights = _encode(tokenizer, answer, fact_weight, item["messages"][-1]["content"].strip(), prompt)
        labels = list(a)
        if not end_loss:  # (rendering the template's end of turn costs a call per item: only when needed)
            end = tokenizer(end_of_turn(tokenizer), add_special_tokens=False)["input_ids"]
            if end and a[-len(end):] == end:
                labels[-len(end):] = [IGNORE] * len(end)
        return Example(p + a, [IGNORE] * len(p) + labels, key, kind, weights=_after(p, weights))
    ids, weights = _encode(tokenizer, item["text"].strip(), fact_weight)
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
        weights = None if weights is None else weights + [1.0]
    labels = list(ids)
    if item.get("context"):  # the chunks, then a blank line, as rag's continuation prompt puts them
        prefix = continuation_prompt("", plain_chunks([c["text"] for c in item["context"]]))
        p = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        return Example(p + ids, [IGNORE] * len(p) + labels, key, kind, weights=_after(p, weights))
    labels[0] = IGNORE  # nothing precedes the first token, so it is never predicted (also inside a packed row)
    return Example(ids, labels, key, kind, weights=weights)


def read_synthetic(ws: Workspace) -> list[tuple[str, dict]]:
    """(key, item) for every line of every ``WS/synth/*.jsonl``, in file then line order; EngrainError on bad data."""
    files = sorted(ws.synth_dir.glob("*.jsonl")) if ws.synth_dir.is_dir() else []
    if not files:
        raise EngrainError(f"No synthetic data: {ws.synth_dir} holds no *.jsonl files.",
                           hint=f"Make some first: engrain synth -w {ws.root}")
    items: list[tuple[str, dict]] = []
    hint = "Fix or delete that line, or regenerate the file with engrain synth."
    for path in files:
        for lineno, item in read_jsonl(path, hint=hint):
            _check_item(item, f"{path}:{lineno}")
            items.append((str(item.get("id") or f"{path.name}:{lineno}"), item))
    if not items:
        raise EngrainError(f"The synthetic data in {ws.synth_dir} is empty ({', '.join(p.name for p in files)}).",
                           hint=f"Regenerate it: engrain synth -w {ws.root}")
    return items


def item_shas(item: dict) -> list[str]:
    """Content hashes of the chunks an item was made from (none for an item written by hand)."""
    shas = item.get("chunk_sha256") or []
    return [shas] if isinstance(shas, str) else list(shas)


def synthesised_chunks(ws: Workspace) -> set[str]:
    """Content hashes of the chunks synthesis has finished, by any strategy (``WS/synth/progress``)."""
    folder = ws.synth_dir / "progress"
    paths = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    return {row["key"] for path in paths for _, row in read_jsonl(path, skip_bad=True, tolerate_torn_tail=True)
            if isinstance(row, dict) and "key" in row}


def learned_documents(ws: Workspace, trained: set[str]) -> dict[str, str]:
    """{document id: content hash} of the corpus documents a memory trained on the chunks ``trained`` (content
    hashes) has learned: each of their chunks was trained on, or synthesis finished it without an item (a chunk
    with nothing to ask about would otherwise keep its document new forever). Empty without a corpus."""
    from ..corpus.schema import read_chunks, read_documents

    if not ws.documents_path.is_file() or not ws.chunks_path.is_file():
        return {}
    covered = set(trained) | synthesised_chunks(ws)
    by_doc: dict[str, set[str]] = {}
    for chunk in read_chunks(ws):
        by_doc.setdefault(chunk.doc_id, set()).add(chunk.sha256)
    return {d.id: d.sha256 for d in read_documents(ws) if by_doc.get(d.id, set()) <= covered}


def is_validation(key: str, fraction: float) -> bool:
    """A stable split: the same item is held out whatever the file order or the number of processes."""
    return _unit_hash(key) < fraction


def _unit_hash(key: str) -> float:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def fact_group(key: str, item: dict) -> tuple[str, bool]:
    """(what the validation split holds out together, whether this item asks about its fact).

    A ``facts`` item names the sentence it is about: every question on a held-out sentence, in every wording,
    stays out of training, while the sentence's statements (the sentence itself, its reversals, the shuffled
    passages) stay in. Validation then asks what a user asks: facts the memory read but was never quizzed on
    (Physics of Language Models 3.1 evaluates knowledge extraction the same way). Any other item is its own group
    and, when held out, leaves training whole (as before)."""
    from ..synth.facts import fact_of, is_question

    variant = str(item.get("variant") or "")
    if item.get("strategy") == "facts":
        fact = fact_of(variant)
        if fact is None:
            return key, False  # a whole chunk's passage: training only
        chunk = "+".join(item.get("chunk_sha256") or item.get("chunk_ids") or [key])
        return f"{chunk}:{fact}", is_question(variant)
    return key, True


def split_examples(examples: list[Example], items: dict[str, dict], fraction: float,
                   max_val: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): whole facts held out (see ``fact_group``), chosen by a stable hash until ``max_val``
    questions are held out."""
    from ..synth.facts import is_polar

    if fraction <= 0 or len(examples) < 10:
        return examples, []
    groups = {e.key: fact_group(e.key, items.get(e.key, {})) for e in examples}
    chosen: set[str] = set()
    count = 0
    by_group: dict[str, int] = {}
    for group, asks in groups.values():
        by_group[group] = by_group.get(group, 0) + int(asks)
    for group in sorted((g for g in by_group if _unit_hash(g) < fraction and by_group[g]), key=_unit_hash):
        if count + by_group[group] > max_val and count:
            break
        chosen.add(group)
        count += by_group[group]
    val = [e for e in examples if groups[e.key][0] in chosen and groups[e.key][1]]
    held = {id(e) for e in val}
    # A held-out fact asked open-book is neither trained (it would quiz the fact) nor validated (its answer is in
    # view, while validation asks closed-book); nor is one asked yes or no (validation scores an answer's first
    # tokens, and "Yes." is right half the time without the fact).
    def validates(item: dict) -> bool:
        return not item.get("context") and not (item.get("strategy") == "facts" and is_polar(str(item.get("variant"))))

    val = [e for e in val if validates(items.get(e.key, {}))]
    return [e for e in examples if id(e) not in held], val


def file_safe(name: str) -> str:
    """A model name as part of a cache file's name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)

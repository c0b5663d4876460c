"""Forgetting: what a trained memory costs the model's general abilities, before vs after.

Two probes written by the project and shipped in the package (engrain/data/):
- ``general_text.txt``: perplexity of plain encyclopedic prose;
- ``general_qa.jsonl``: short general-knowledge questions the base model answers right.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

from ..memory.base import Memory
from . import metrics
from .bench import Question, read_questions


def general_text() -> str:
    return resources.files("engrain").joinpath("data/general_text.txt").read_text(encoding="utf-8")


def general_questions() -> list[Question]:
    path = Path(str(resources.files("engrain").joinpath("data/general_qa.jsonl")))
    return read_questions(path)


def perplexity(model, tokenizer, text: str, window: int = 512) -> float:
    """Token-level perplexity over non-overlapping windows (the same windows before and after training)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window].unsqueeze(0).to(device)
            if chunk.shape[1] < 2:
                break
            out = model(input_ids=chunk, attention_mask=torch.ones_like(chunk), labels=chunk)
            n = chunk.shape[1] - 1
            total_nll += float(out.loss) * n
            total_tokens += n
    return math.exp(total_nll / max(1, total_tokens))


def general_accuracy(memory: Memory, questions: list[Question] | None = None) -> float:
    return _general(memory, questions)[0]


def _general(memory: Memory, questions: list[Question] | None = None) -> tuple[float, list]:
    """(contains accuracy on the general questions, the answers)."""
    questions = questions or general_questions()
    answers = memory.answer([q.question for q in questions], max_new_tokens=32)
    return sum(metrics.contains(a.text, q.answers) for q, a in zip(questions, answers)) / len(questions), answers


def gated(memory: Memory, base_cache: dict) -> dict:
    """General QA as a gated memory answers it (the relevance gate sends most general questions to the base
    weights), with the share the gate sent to the trained weights; ``measure`` must have filled ``base_cache``."""
    acc, answers = _general(memory)
    routed = sum(1 for a in answers if a.meta.get("weights") not in (None, "base")) / len(answers)
    return {"gated_general_qa_after": acc, "gated_general_qa_delta": acc - base_cache["acc"],
            "gate_general_to_memory": routed}


def measure(memory: Memory, base_memory: Memory, base_cache: dict) -> dict:
    """Forgetting of ``memory`` relative to the base model; ``base_cache`` keeps the base numbers across methods."""
    if "ppl" not in base_cache:
        base_lm = base_memory.lm
        base_cache["ppl"] = perplexity(base_lm.model, base_lm.tokenizer, general_text())
        base_cache["acc"] = general_accuracy(base_memory)
    lm = memory.lm
    ppl = perplexity(lm.model, lm.tokenizer, general_text())
    questions = general_questions()
    acc, answers = _general(memory, questions)
    # Each answer by question id, so that two memories' forgetting can be tested question by question
    # (`engrain paired general ...`): a seed moves it by several of the general questions.
    return {"general_qa_before": base_cache["acc"], "general_qa_after": acc,
            "general_qa_delta": acc - base_cache["acc"], "perplexity_before": base_cache["ppl"],
            "perplexity_after": ppl, "perplexity_ratio": ppl / base_cache["ppl"], "n_general_questions": len(questions),
            "general_answers": {q.id: a.text for q, a in zip(questions, answers)}}


def of_trained(memory, base_memory: Memory, base_cache: dict) -> dict:
    """A trained memory's forgetting: its weights asked closed-book (``measure``), and general QA as the memory
    answers it through its relevance gate when it has one (``gated``)."""
    from ..memory.base import ClosedBook

    out = measure(ClosedBook(memory.lm), base_memory, base_cache)
    if getattr(memory, "gate", None) is not None:
        out.update(gated(memory, base_cache))
    return out


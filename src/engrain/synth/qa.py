"""Question/answer pairs (self-study): the model asks about a chunk, then answers WITH the chunk in view.

Stage 1 picks a sentence and one of its facts (a name, number or date) and asks the model for a question
whose answer is that fact; half the slots ask for wording unlike the sentence's. Stage 2 answers the
question with the whole chunk in the prompt. The pair is kept as a closed-book example (the question
alone -> the answer) only if the answer contains the targeted fact: a cheap self-consistency check
that catches most of a small model's wrong questions and wrong answers.
"""

from __future__ import annotations

import re

from .base import Candidate, Job, Unit
from .text import normalize, spans

NAME = "qa"
KIND = "messages"
USES_MODEL = True
QUESTION_TOKENS = 40
ANSWER_TOKENS = 48

EXAMPLE_SENTENCE = "The Harlow Bridge, designed by Clara Voss, opened in 1931."
EXAMPLES = [("Clara Voss", "Who designed the Harlow Bridge?"), ("1931", "In what year did the Harlow Bridge open?")]
KINDS = {"name": "who or what", "number": "how many or how much", "date": "when"}


def ask(sentence: str, answer: str, kind: str, reword: bool) -> str:
    extra = " Use different words than the sentence." if reword else ""
    return f'Sentence: {sentence}\n\nWrite one question ({KINDS[kind]}) whose answer is "{answer}".{extra}'


def targets(unit: Unit) -> list[tuple[str, str, str]]:
    """(sentence, fact, kind) for every fact of the chunk's complete sentences, in reading order."""
    out = []
    for sent in unit.sentences:
        if not re.search(r"[.!?][\"'”’)]?$", sent):
            continue
        for sp in spans(sent):
            out.append((sent, sp.text, sp.kind))
    return out


def jobs(unit: Unit, slots: list[int], round_: int, state: dict | None = None) -> list[Job]:
    found = targets(unit)
    if not found:
        return []
    out = []
    for slot in slots:
        k = slot + round_ * 7
        sent, fact, kind = found[k % len(found)]
        reword = (k // len(found) + slot) % 2 == 1
        messages = []
        for ans, q in EXAMPLES:
            messages += [{"role": "user", "content": ask(EXAMPLE_SENTENCE, ans, "name" if ans[0].isalpha() else "date",
                                                         False)},
                         {"role": "assistant", "content": q}]
        messages.append({"role": "user", "content": ask(sent, fact, kind, reword)})
        out.append(Job(unit, f"r{round_}-{slot}", messages, source=unit.chunk.text, max_tokens=QUESTION_TOKENS,
                       stage="question", data={"fact": fact, "sentence": sent}))
    return out


def first_question(text: str) -> str | None:
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:Question:|Q:|[-*•]|\d+[.)])\s*", "", line).strip()
        if line.endswith("?") and len(line.split()) >= 3:
            return line
    return None


def answer_messages(question: str, chunk_text: str) -> list[dict]:
    return [{"role": "system", "content": "Answer the question from the text, in one short sentence."},
            {"role": "user", "content": f"Text: {chunk_text}\n\nQuestion: {question}"}]


def on_output(job: Job, text: str, finish_reason: str) -> list[Job | Candidate]:
    fact = job.data["fact"]
    if job.stage == "question":
        question = first_question(text)
        if question is None:
            return [Candidate(job.unit, job.variant, job.source, text=text, check=text, reject="no-question")]
        if normalize(fact) in normalize(question):
            return [Candidate(job.unit, job.variant, job.source, text=question, check=question,
                              reject="question-gives-answer")]
        return [Job(job.unit, job.variant, answer_messages(question, job.unit.chunk.text), source=job.source,
                    max_tokens=ANSWER_TOKENS, stage="answer", temperature=0.0,
                    data={**job.data, "question": question})]
    question = job.data["question"]
    cand = Candidate(job.unit, job.variant, job.source,
                     messages=[{"role": "user", "content": question}, {"role": "assistant", "content": text}],
                     check=f"{question}\n{text}", finish_reason=finish_reason)
    if normalize(fact) not in normalize(text):
        cand.reject = "answer-misses-fact"
    return [cand]

"""How a question or a sentence start becomes a prompt: the chat template, the default system message, documents
placed before the question, and raw continuation of a cloze probe.
"""

from __future__ import annotations

from ..errors import EngrainError

# One source of truth for how conversations become tokens: training, evaluation and serving all call
# chat_prompt(). Models without a template of their own get ChatML (SmolLM2's own format).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


DEFAULT_SYSTEM = "You are a helpful assistant. Answer briefly and exactly."


def chat_messages(question: str, context: str | None = None, system: str | None = DEFAULT_SYSTEM) -> list[dict]:
    """The messages for one question, optionally with documents in view."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": context_question(question, context) if context else question})
    return messages


def context_question(question: str, context: str) -> str:
    """How a question is asked with documents in view (rag, context, and the distillation teacher)."""
    return f"Use the documents below to answer.\n\n{context}\n\nQuestion: {question}"


def chat_prompt(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render messages with the model's chat template (the single place this happens)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def end_of_turn(tokenizer) -> str:
    """The text that closes an assistant turn in this template (what training appends to answers)."""
    probe = chat_prompt(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\x00"}],
                        add_generation_prompt=False)
    tail = probe.split("\x00", 1)[1]
    return tail.rstrip("\n") or (tokenizer.eos_token or "")


def render_chunks(chunks: list[tuple[str, str]]) -> str:
    """(chunk id, text) pairs as the chat form shows them: each labelled with its id, so an answer can cite it
    (rag, hybrids, open-book training items and the distillation teacher)."""
    return "\n\n".join(f"[{chunk_id}]\n{text.strip()}" for chunk_id, text in chunks)


def plain_chunks(texts: list[str]) -> str:
    """Chunk texts as the continuation form shows them: alone, separated by blank lines."""
    return "\n\n".join(t.strip() for t in texts)


def continuation_prompt(start: str, context: str | None = None) -> str:
    """The plain-text prompt that continues ``start``: the context (when given) and a blank line, then the start.
    No chat template and no system message: the model reads text and writes what comes next."""
    return f"{context}\n\n{start}" if context else start


def first_line(text: str) -> str:
    """A continuation cut at its first newline and stripped: a continuation is the rest of one sentence, and what
    follows a newline is a new paragraph the probe did not ask for."""
    return text.split("\n", 1)[0].strip()


def check_starts(starts: list[str]) -> None:
    """Refuse an empty sentence start: there is nothing to continue (and no prompt at all without a context)."""
    empty = [i for i, s in enumerate(starts) if not s.strip()]
    if empty:
        raise EngrainError(f"Sentence start number {empty[0] + 1} of {len(starts)} is empty, so there is nothing to "
                           "continue.", hint="Give every cloze probe the start of its sentence in 'question'.")

"""Generation: greedy or sampled answers for a batch of prompts, through ``fastgen`` where the model supports it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import EngrainError
from .load import LM
from .prompts import (
    DEFAULT_SYSTEM,
    chat_messages,
    chat_prompt,
    check_starts,
    continuation_prompt,
    first_line,
)
from .stops import line_break_ids, stop_index, stop_token_ids


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) or "length"


def generate(lm: LM, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             stop: list[str] | None = None, batch_size: int = 16, seed: int | None = None,
             repetition_penalty: float = 1.0, progress=None, one_line: bool = False) -> list[Generation]:
    """Generate a completion for every prompt (text as the model reads it: chat-formatted, or raw for continuation).

    Prompts are sorted by length and run ``batch_size`` at a time with left padding, so batches waste
    little on padding (on the fast path, finished rows are replaced by waiting prompts as they go); results
    come back in the input order. ``temperature == 0`` is greedy.
    ``progress`` is an optional callable(n_done) for progress bars. ``one_line``: stop at the first line break
    (``line_break_ids``), for continuations.
    """
    import torch

    tok = lm.tokenizer
    if seed is not None:
        torch.manual_seed(seed)
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    _check_window(encoded, max_new_tokens, lm.max_context)
    stop_ids = stop_token_ids(tok) + (line_break_ids(tok) if one_line else [])
    pad_id = tok.pad_token_id
    # The lean decode loop (fastgen.py) when it applies: same greedy tokens, several times faster on CPU, and
    # continuous batching (finished rows make room for waiting prompts) across all the prompts at once.
    from . import fastgen

    if fastgen.supports(lm.model, stop=stop, repetition_penalty=repetition_penalty):
        new = fastgen.generate_many(lm.model, encoded, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                    stop_ids=stop_ids, pad_id=pad_id, temperature=temperature, top_p=top_p,
                                    seed=seed, progress=progress)
    else:
        new = _generate_batched(lm, encoded, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                stop=stop, batch_size=batch_size, repetition_penalty=repetition_penalty,
                                progress=progress, stop_ids=stop_ids)
    return _generations(tok, encoded, new, stop_ids, stop)


def _check_window(encoded: list[list[int]], max_new_tokens: int, window: int) -> None:
    """Refuse a prompt that leaves no room in the model's window for ``max_new_tokens``."""
    for seq in encoded:
        if len(seq) + max_new_tokens > window:
            raise EngrainError(f"A prompt of {len(seq)} tokens plus {max_new_tokens} new tokens exceeds the model's "
                               f"window of {window} tokens.", hint="Shorten the prompt or lower max tokens.")


def _generations(tok, encoded: list[list[int]], new: list[list[int]], stop_ids: list[int],
                 stop: list[str] | None = None) -> list[Generation]:
    """Each prompt's new tokens as text, cut at the first stop token (or ``stop`` string)."""
    results = []
    for seq, prompt in zip(new, encoded):
        n = stop_index(seq, stop_ids)
        finish = "stop" if n < len(seq) else "length"
        text = tok.decode(seq[:n], skip_special_tokens=True)
        if stop:
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        results.append(Generation(text=text.strip(), prompt_tokens=len(prompt), completion_tokens=n,
                                  finish_reason=finish))
    return results


def fused_generate(readings: list[tuple[LM, list[str], float]], *, max_new_tokens: int = 48, batch_size: int = 16,
                   one_line: bool = False) -> list[Generation]:
    """Greedy answers from several readings of the same questions at once (``fused.py``): each reading is (LM, its
    prompt per question, weight), all LMs on one tokenizer; the next token maximises the weighted sum of the
    readings' log-probabilities. Token counts are the first reading's prompt and the answer."""
    from . import fastgen
    from .fused import Reading, fused_tokens

    unfit = [lm.name for lm, _, _ in readings if not fastgen.supports(lm.model)]
    if unfit:
        raise EngrainError(f"Fused decoding runs Llama-family models through engrain's decode loop; {unfit[0]} is not "
                           f"one (or ENGRAIN_FASTGEN=0 is set).", hint="Set rag.hybrid: read in engrain.yaml.")
    tok = readings[0][0].tokenizer
    encoded = [[tok(p, add_special_tokens=False)["input_ids"] for p in prompts] for _, prompts, _ in readings]
    for (lm, _, _), seqs in zip(readings, encoded):
        _check_window(seqs, max_new_tokens, lm.max_context)
    stop_ids = stop_token_ids(tok) + (line_break_ids(tok) if one_line else [])
    new = fused_tokens([Reading(lm.model, seqs, w) for (lm, _, w), seqs in zip(readings, encoded)],
                       max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=tok.pad_token_id,
                       batch_size=batch_size)
    return _generations(tok, encoded[0], new, stop_ids)


def _generate_batched(lm: LM, encoded: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                      stop: list[str] | None, batch_size: int, repetition_penalty: float, progress,
                      stop_ids: list[int] | None = None) -> list[list[int]]:
    """New tokens per prompt through ``model.generate()``, in length-sorted batches with left padding: the path
    for what fastgen does not cover (other architectures, stop strings, repetition penalty)."""
    import torch

    from .fastgen import left_pad

    tok = lm.tokenizer
    pad_id = tok.pad_token_id
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=stop_ids or stop_token_ids(tok), pad_token_id=pad_id,
                  repetition_penalty=repetition_penalty)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stop:
        kwargs.update(stop_strings=stop, tokenizer=tok)
    new: list[list[int]] = [[] for _ in encoded]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = left_pad([encoded[i] for i in idx], pad_id)
        with torch.inference_mode():
            out = lm.model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), **kwargs)
        for row, i in enumerate(idx):
            new[i] = out[row, ids.shape[1]:].tolist()
        if progress is not None:
            progress(len(idx))
    return new


def answer(lm: LM, questions: list[str], contexts: list[str | None] | None = None, *, max_new_tokens: int = 48,
           batch_size: int = 16, system: str | None = DEFAULT_SYSTEM, progress=None) -> list[Generation]:
    """Answer questions with greedy decoding, each optionally with its own context in the prompt. ``progress``: as
    ``generate``'s."""
    contexts = contexts or [None] * len(questions)
    prompts = [chat_prompt(lm.tokenizer, chat_messages(q, c, system)) for q, c in zip(questions, contexts)]
    return generate(lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)


def cut_continuation(gen: Generation) -> Generation:
    """``gen`` with its text cut by ``first_line`` (a cut counts as a stop); token counts are what was generated."""
    if "\n" not in gen.text:
        return gen
    return Generation(text=first_line(gen.text), prompt_tokens=gen.prompt_tokens,
                      completion_tokens=gen.completion_tokens, finish_reason="stop")


def continue_text(lm: LM, starts: list[str], contexts: list[str | None] | None = None, *, max_new_tokens: int = 32,
                  batch_size: int = 16) -> list[Generation]:
    """Continue each start as raw text with greedy decoding, optionally after its own context; each text is the
    continuation alone, cut at its first newline."""
    check_starts(starts)
    contexts = contexts or [None] * len(starts)
    prompts = [continuation_prompt(s, c) for s, c in zip(starts, contexts)]
    gens = generate(lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, one_line=True)
    return [cut_continuation(g) for g in gens]

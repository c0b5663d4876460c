"""Where generation stops: the end-of-turn tokens, and line breaks for one-line continuations.
"""

from __future__ import annotations


def stop_token_ids(tokenizer) -> list[int]:
    """The end-of-turn ids, found once per tokenizer: reading its whole vocabulary costs more than a short prompt's
    prefill, and every generate() asks."""
    cached = getattr(tokenizer, "_engrain_stop_ids", None)
    if cached is None:
        ids = {tokenizer.eos_token_id}
        vocab = tokenizer.get_vocab()
        for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"):
            if tok in vocab:
                ids.add(vocab[tok])
        cached = sorted(i for i in ids if i is not None)
        tokenizer._engrain_stop_ids = cached
    return list(cached)


def line_break_ids(tokenizer) -> list[int]:
    """Ids of the tokens that are nothing but whitespace holding a line break: a continuation ends at the first
    one (``first_line`` cuts there anyway), so decoding stops there instead of writing tokens that are cut off."""
    cached = getattr(tokenizer, "_engrain_line_breaks", None)
    if cached is None:
        texts = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        cached = [i for i, t in enumerate(texts) if t is not None and "\n" in tokenizer.convert_tokens_to_string([t])
                  and not tokenizer.convert_tokens_to_string([t]).strip()]
        tokenizer._engrain_line_breaks = cached
    return cached


def stop_index(seq: list[int], stop_ids: list[int]) -> int:
    """How many tokens of ``seq`` come before its first stop token (all of them when there is none)."""
    return next((j for j, t in enumerate(seq) if t in stop_ids), len(seq))

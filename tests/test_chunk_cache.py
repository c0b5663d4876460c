"""Retrieved chunks' KV reused wherever a chunk comes back (``chunk_cache.py``, ``engrain serve --reuse-chunks``):
the tokens it gives are those of attention in which each chunk sees the prompt's head and itself, not the chunks
before it, and the question sees everything."""

from __future__ import annotations

import torch
from stream_loop import decode_all

from engrain.models import stream as stream_mod
from engrain.models.chunk_cache import ChunkCache, chunk_segments, rotate_keys

HEAD = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nUse the documents below.\n\n"
CHUNKS = ["[acme-1]\nThe lighthouse at Pellmouth was built in 1872 by the harbour board.",
          "[acme-2]\nIts keeper, Hollis Grieve, kept a log of every ship for forty years.",
          "[acme-3]\nThe mill on the river ground wheat until the flood of 1931."]


def _prompt(tok, order: list[int], question: str = "Who kept the log?"):
    pieces = [CHUNKS[i] for i in order]
    text = HEAD + "\n\n".join(pieces) + f"\n\nQuestion: {question}<|im_end|>\n<|im_start|>assistant\n"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], chunk_segments(enc["offset_mapping"], text, pieces)


def test_chunk_segments_are_contiguous_token_ranges_of_each_chunk(tiny_lm):
    tok = tiny_lm.tokenizer
    ids, segs = _prompt(tok, [1, 0])
    assert len(segs) == 2 and segs[0][1] == segs[1][0]
    assert tok.decode(ids[segs[0][0]:segs[0][1]]).startswith("[acme-2]")
    assert tok.decode(ids[segs[1][0]:segs[1][1]]) == CHUNKS[0]
    assert chunk_segments([(0, 3)], "abc", ["zzz"]) == []  # a piece the prompt does not hold: no reuse


def test_rotating_a_key_by_d_equals_embedding_it_at_position_plus_d(tiny_lm):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_lm.model
    k = torch.randn(1, 2, 5, model.config.hidden_size // model.config.num_attention_heads)
    pos = torch.arange(3, 8)[None]
    cos, sin = model.model.rotary_emb(k, pos)
    cos2, sin2 = model.model.rotary_emb(k, pos + 11)
    at_p, _ = apply_rotary_pos_emb(k, k, cos, sin)
    at_p_plus_d, _ = apply_rotary_pos_emb(k, k, cos2, sin2)
    moved = rotate_keys(model, [(at_p, k)], 11)[0][0]
    torch.testing.assert_close(moved, at_p_plus_d, atol=1e-5, rtol=1e-5)


def _reference_first_logits(model, ids: list[int], segs: list[tuple[int, int]]) -> torch.Tensor:
    """The reference, through transformers' own forward: each chunk read right after the head alone, its keys
    rotated to where the prompt has it, then the question read after all of them."""
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    head = ids[:segs[0][0]]
    layers = []
    with torch.no_grad():
        for n, (a, b) in enumerate(segs):
            past = model(torch.tensor([head + ids[a:b]]), use_cache=True).past_key_values
            for li in range(len(past.layers)):
                k, v = past.layers[li].keys, past.layers[li].values
                cos, sin = model.model.rotary_emb(k, torch.tensor([[a - len(head)]]))
                moved = apply_rotary_pos_emb(k[:, :, len(head):], k[:, :, len(head):], cos, sin)[0]
                part = ([k[:, :, :len(head)]] if n == 0 else []) + [moved], \
                       ([v[:, :, :len(head)]] if n == 0 else []) + [v[:, :, len(head):]]
                if n == 0:
                    layers.append(part)
                else:
                    layers[li][0].extend(part[0])
                    layers[li][1].extend(part[1])
        cache = DynamicCache()
        for li, (ks, vs) in enumerate(layers):
            cache.update(torch.cat(ks, dim=2), torch.cat(vs, dim=2), li)
        c = segs[-1][1]
        out = model(torch.tensor([ids[c:]]), cache=cache, position_ids=torch.arange(c, len(ids))[None])
    return out.logits[0, -1]


def test_reused_chunks_give_the_logits_of_each_chunk_read_after_the_head_alone(tiny_lm):
    tok, model = tiny_lm.tokenizer, tiny_lm.model
    cache = ChunkCache()
    stream = stream_mod.Stream(model, pad_id=tok.pad_token_id, chunk_cache=cache)
    first, first_segs = _prompt(tok, [0, 1, 2])
    second, second_segs = _prompt(tok, [2, 0], "When was the lighthouse built?")
    stream.admit([first, second], [1, 1], [first_segs, second_segs])
    assert cache.stats == {"chunks": 5, "chunk_hits": 0, "tokens_reused": 0}  # the first time: all computed
    for row, (ids, segs) in enumerate([(first, first_segs), (second, second_segs)]):
        reference = _reference_first_logits(model, ids, segs)
        torch.testing.assert_close(stream.rows.logits[row], reference, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            full = model(torch.tensor([ids])).logits[0, -1]
        assert (full - reference).abs().max() > 1e-3  # not full attention: the reference tells them apart
    # Another question over the same chunks in another order: each comes from the cache (a chunk's tokens include
    # the separator after it, so each is cached as the middle and the last chunk apart; both were seen above).
    third, third_segs = _prompt(tok, [1, 2, 0], "What did the mill grind?")
    again = stream_mod.Stream(model, pad_id=tok.pad_token_id, chunk_cache=cache)
    again.admit([third], [1], [third_segs])
    assert cache.stats["chunk_hits"] == 3
    torch.testing.assert_close(again.rows.logits[0], _reference_first_logits(model, third, third_segs),
                               atol=1e-5, rtol=1e-5)


def test_one_chunk_after_the_head_is_exact_and_prompts_without_chunks_are_untouched(tiny_lm):
    from engrain.models import fastgen

    tok, model = tiny_lm.tokenizer, tiny_lm.model
    ids, segs = _prompt(tok, [1])
    plain = tok("Hello there", add_special_tokens=False)["input_ids"]
    alone = [fastgen.generate_many(model, [p], batch_size=1, max_new_tokens=6, stop_ids=[-1],
                                   pad_id=tok.pad_token_id)[0] for p in (ids, plain)]
    stream = stream_mod.Stream(model, pad_id=tok.pad_token_id, chunk_cache=ChunkCache())
    assert decode_all(stream, [ids, plain], 6, [segs, []]) == alone
